// Command outcomes has one test case per way an instance can end, on the published sdk-go
// with a sync client attached (InitializedTestCaseFn), so that its outcome reaches the
// run_events topic, which container runners take outcomes from: `ok` succeeds, `fail`
// returns an error, `panic` panics, `stall` never ends, and `silent-exit` exits with status
// 0 without reporting an outcome (the original's issue 1349: the run must fail).
package main

import (
	"errors"
	"os"
	"time"

	"github.com/testground/sdk-go/run"
	"github.com/testground/sdk-go/runtime"
)

var testcases = map[string]interface{}{
	"ok":          run.InitializedTestCaseFn(ok),
	"fail":        run.InitializedTestCaseFn(fail),
	"panic":       run.InitializedTestCaseFn(panics),
	"stall":       run.InitializedTestCaseFn(stall),
	"silent-exit": run.InitializedTestCaseFn(silentExit),
}

func main() {
	run.InvokeMap(testcases)
}

func ok(runenv *runtime.RunEnv, _ *run.InitContext) error {
	runenv.RecordMessage("all good")
	return nil
}

func fail(runenv *runtime.RunEnv, _ *run.InitContext) error {
	return errors.New("failing on purpose")
}

func panics(runenv *runtime.RunEnv, _ *run.InitContext) error {
	panic("panicking on purpose")
}

func stall(runenv *runtime.RunEnv, _ *run.InitContext) error {
	runenv.RecordMessage("stalling")
	time.Sleep(24 * time.Hour)
	return nil
}

func silentExit(runenv *runtime.RunEnv, _ *run.InitContext) error {
	runenv.RecordMessage("exiting without an outcome")
	os.Exit(0)
	return nil
}
