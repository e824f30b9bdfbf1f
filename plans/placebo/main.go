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
	"metrics":     run.TestCaseFn(recordMetrics),
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

// recordMetrics records a point, a counter and a histogram in results and
// diagnostics, with a tag in one name, for the InfluxDB export tests.
func recordMetrics(runenv *runtime.RunEnv) error {
	runenv.R().RecordPoint("answer,kind=placebo", 42)
	runenv.R().Counter("iterations").Inc(3)
	h := runenv.R().Histogram("value", runenv.R().NewUniformSample(100))
	for i := 0; i < 10; i++ {
		h.Update(int64(i))
	}
	runenv.D().RecordPoint("diagnostic", 1)
	runenv.D().Counter("ticks").Inc(2)
	// sdk-go writes aggregates only on its tickers (results every second,
	// diagnostics every 5 s), never at close: outlive one diagnostics tick.
	time.Sleep(5500 * time.Millisecond)
	runenv.RecordMessage("recorded metrics")
	return nil
}
