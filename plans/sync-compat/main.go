// Command sync-compat checks that the Rust sync service speaks the protocol the
// published Go SDK (sdk-go v0.3.0) expects: sequence numbers, barriers, pub/sub
// with history replay, and the outcomes of failing and panicking instances.
//
// Every case is a run.InitializedTestCaseFn, so each instance also goes through
// the SDK's InitContext (signal_entry on initialized_global and
// initialized_group_<id>, run events on the wire, and the websocket close
// handshake after the outcome is recorded).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/testground/sdk-go/run"
	"github.com/testground/sdk-go/runtime"
	"github.com/testground/sdk-go/sync"
)

// caseTimeout bounds every case, so a protocol bug fails the instance instead of
// hanging the run until the runner's own timeout.
const caseTimeout = 60 * time.Second

// extraWait is how long a subscriber keeps listening after it has everything it
// expects, to catch duplicates delivered after the last expected item.
const extraWait = 200 * time.Millisecond

var testcases = map[string]interface{}{
	"seq":             run.InitializedTestCaseFn(seqCase),
	"barriers":        run.InitializedTestCaseFn(barriers),
	"pubsub":          run.InitializedTestCaseFn(pubsub),
	"late-subscriber": run.InitializedTestCaseFn(lateSubscriber),
	"failure":         run.InitializedTestCaseFn(failure),
	"panic":           run.InitializedTestCaseFn(panicking),
}

func main() {
	run.InvokeMap(testcases)
}

// seqCase checks that GlobalSeq values are a permutation of 1..N, by having every
// instance publish its own and read back everybody's, and that GroupSeq lies in
// 1..TEST_GROUP_INSTANCE_COUNT. The message lets the test check that group
// sequence numbers are a permutation per group too.
func seqCase(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	ctx, cancel := context.WithTimeout(context.Background(), caseTimeout)
	defer cancel()
	n := runenv.TestInstanceCount
	client := initCtx.SyncClient

	runenv.RecordMessage("compat seq: global_seq=%d group_seq=%d", initCtx.GlobalSeq, initCtx.GroupSeq)
	if initCtx.GroupSeq < 1 || initCtx.GroupSeq > int64(runenv.TestGroupInstanceCount) {
		return fmt.Errorf("group seq %d outside 1..%d", initCtx.GroupSeq, runenv.TestGroupInstanceCount)
	}
	if initCtx.GlobalSeq < 1 || initCtx.GlobalSeq > int64(n) {
		return fmt.Errorf("global seq %d outside 1..%d", initCtx.GlobalSeq, n)
	}

	topic := sync.NewTopic("global-seqs", int64(0))
	if _, err := client.Publish(ctx, topic, initCtx.GlobalSeq); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	return expectSeqs(ctx, client, topic, n)
}

// expectSeqs subscribes to an int64 topic and fails unless it delivers exactly
// 1..n, each once.
func expectSeqs(ctx context.Context, client sync.Client, topic *sync.Topic, n int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan int64, n)
	sub, err := client.Subscribe(ctx, topic, ch)
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	seen := make(map[int64]bool, n)
	for len(seen) < n {
		select {
		case v := <-ch:
			if v < 1 || v > int64(n) {
				return fmt.Errorf("received seq %d outside 1..%d", v, n)
			}
			if seen[v] {
				return fmt.Errorf("received seq %d twice", v)
			}
			seen[v] = true
		case err := <-sub.Done():
			return fmt.Errorf("subscription ended after %d of %d items: %v", len(seen), n, err)
		case <-ctx.Done():
			return fmt.Errorf("received %d of %d items: %w", len(seen), n, ctx.Err())
		}
	}
	select {
	case v := <-ch:
		return fmt.Errorf("received an extra item %d after all %d", v, n)
	case <-time.After(extraWait):
		return nil
	}
}

// barrierTimeout bounds the barriers case. Longer than caseTimeout: the first
// round waits for the last instance to start, and starting 5,000 sdk-go instances
// on a loaded 2-core machine took 128 s (issue 12), so 60 s failed every instance.
const barrierTimeout = 10 * time.Minute

// barriers runs ten rounds of SignalAndWait; each round's seq must be in 1..N.
// Distinct state names per round make every round a fresh counter.
func barriers(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	ctx, cancel := context.WithTimeout(context.Background(), barrierTimeout)
	defer cancel()
	n := runenv.TestInstanceCount
	for i := 0; i < 10; i++ {
		state := sync.State(fmt.Sprintf("round-%d", i))
		seq, err := initCtx.SyncClient.SignalAndWait(ctx, state, n)
		if err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		if seq < 1 || seq > int64(n) {
			return fmt.Errorf("round %d: seq %d outside 1..%d", i, seq, n)
		}
	}
	runenv.RecordMessage("compat barriers: 10 rounds passed")
	return nil
}

// Item is the pubsub payload. Big and Text are there to catch a server that
// re-encodes payloads: integers above 2^53 must survive, and characters that
// Go's encoder escapes must round-trip.
type Item struct {
	Seq  int64
	Host string
	Big  uint64
	Text string
}

const itemText = "quote\" <tag> & ünïcode \\ done"

func bigFor(seq int64) uint64 { return 1<<62 + uint64(seq) }

// pubsub is all-to-all: every instance publishes one Item and must receive all
// N distinct ones (its own included, unchanged).
func pubsub(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	ctx, cancel := context.WithTimeout(context.Background(), caseTimeout)
	defer cancel()
	n := runenv.TestInstanceCount
	host, err := os.Hostname()
	if err != nil {
		return err
	}
	// local:exec runs every instance on one host; the pid keeps Host distinct.
	me := Item{
		Seq:  initCtx.GlobalSeq,
		Host: fmt.Sprintf("%s/%d", host, os.Getpid()),
		Big:  bigFor(initCtx.GlobalSeq),
		Text: itemText,
	}
	topic := sync.NewTopic("all-to-all", &Item{})
	ch := make(chan *Item, n)
	_, sub, err := initCtx.SyncClient.PublishSubscribe(ctx, topic, &me, ch)
	if err != nil {
		return fmt.Errorf("publish/subscribe: %w", err)
	}
	seen := make(map[int64]bool, n)
	hosts := make(map[string]bool, n)
	for len(seen) < n {
		select {
		case it := <-ch:
			if it.Seq < 1 || it.Seq > int64(n) || seen[it.Seq] {
				return fmt.Errorf("unexpected or duplicate item %+v", *it)
			}
			if hosts[it.Host] {
				return fmt.Errorf("host %q published twice", it.Host)
			}
			if it.Big != bigFor(it.Seq) || it.Text != itemText {
				return fmt.Errorf("payload altered in transit: %+v", *it)
			}
			if it.Seq == me.Seq && *it != me {
				return fmt.Errorf("own item came back as %+v, sent %+v", *it, me)
			}
			seen[it.Seq] = true
			hosts[it.Host] = true
		case err := <-sub.Done():
			return fmt.Errorf("subscription ended after %d of %d items: %v", len(seen), n, err)
		case <-ctx.Done():
			return fmt.Errorf("received %d of %d items: %w", len(seen), n, ctx.Err())
		}
	}
	select {
	case it := <-ch:
		return fmt.Errorf("received an extra item %+v after all %d", *it, n)
	case <-time.After(extraWait):
	}
	runenv.RecordMessage("compat pubsub: received all %d items", n)
	return nil
}

// lateSubscriber checks full history replay: instance 1 subscribes only after
// everyone has published (guaranteed by the "published" barrier) and must still
// get all N items. The final barrier keeps the others connected until it has.
func lateSubscriber(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	ctx, cancel := context.WithTimeout(context.Background(), caseTimeout)
	defer cancel()
	n := runenv.TestInstanceCount
	client := initCtx.SyncClient
	topic := sync.NewTopic("history", int64(0))

	if _, err := client.Publish(ctx, topic, initCtx.GlobalSeq); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if _, err := client.SignalAndWait(ctx, "published", n); err != nil {
		return fmt.Errorf("published barrier: %w", err)
	}
	if initCtx.GlobalSeq == 1 {
		if err := expectSeqs(ctx, client, topic, n); err != nil {
			return fmt.Errorf("late subscriber: %w", err)
		}
		runenv.RecordMessage("compat late-subscriber: replayed all %d items", n)
	}
	if _, err := client.SignalAndWait(ctx, "done", n); err != nil {
		return fmt.Errorf("done barrier: %w", err)
	}
	return nil
}

// failure: instance 1 returns an error, the others succeed.
func failure(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	if initCtx.GlobalSeq == 1 {
		return errors.New("sync-compat failure requested for instance 1")
	}
	return nil
}

// panicking: instance 1 panics, the others succeed.
func panicking(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	if initCtx.GlobalSeq == 1 {
		panic("sync-compat panic requested for instance 1")
	}
	return nil
}
