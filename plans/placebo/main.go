// Command placebo is a smoke-test plan: each test case exercises one outcome
// the runners must report (success, failure, crash, stall, missing terminal event),
// plus parameter passing and output collection.
package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/testground/sdk-go/run"
	"github.com/testground/sdk-go/runtime"
)

var testcases = map[string]interface{}{
	"ok":          run.TestCaseFn(ok),
	"fail":        run.TestCaseFn(fail),
	"panic":       run.TestCaseFn(panicking),
	"stall":       run.TestCaseFn(stall),
	"no-terminal": run.TestCaseFn(noTerminal),
	"params":      run.TestCaseFn(params),
	"output":      run.TestCaseFn(output),
}

func main() {
	run.InvokeMap(testcases)
}

func ok(runenv *runtime.RunEnv) error {
	runenv.RecordMessage("placebo ok")
	return nil
}

func fail(runenv *runtime.RunEnv) error {
	return errors.New("placebo failure requested")
}

func panicking(runenv *runtime.RunEnv) error {
	panic("placebo panic requested")
}

func stall(runenv *runtime.RunEnv) error {
	// Long enough that only the runner's timeout or cancellation ends it.
	time.Sleep(24 * time.Hour)
	return nil
}

func noTerminal(runenv *runtime.RunEnv) error {
	runenv.RecordMessage("exiting without a terminal event")
	// os.Exit skips the SDK's RecordSuccess, which is the point of this case.
	os.Exit(0)
	return nil
}

func params(runenv *runtime.RunEnv) error {
	answer := runenv.IntParam("answer")
	word := runenv.StringParam("word")
	runenv.RecordMessage("params: answer=%d word=%s", answer, word)
	if answer != 42 && word != "any" {
		return fmt.Errorf("wrong answer: %d", answer)
	}
	return nil
}

func output(runenv *runtime.RunEnv) error {
	f, err := runenv.CreateRawAsset("hello.txt")
	if err != nil {
		return err
	}
	if _, err := f.WriteString("hello"); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	runenv.R().RecordPoint("placebo_answer", 42)
	runenv.RecordMessage("wrote hello.txt")
	return nil
}
