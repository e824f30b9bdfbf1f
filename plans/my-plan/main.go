// The ping-pong test plan of the text this project started from ("Testing Peer-to-Peer
// Systems With Testground"), assembled from its snippets as a reader would: two instances
// shape their link (100 ms latency, 1 MiB bandwidth), move to new data IPs, connect over TCP
// and check the round-trip time lands in [200 ms, 250 ms]. Its manifest is the text's, as
// printed: only docker:go and local:docker are enabled.
package main

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/testground/sdk-go/network"
	"github.com/testground/sdk-go/run"
	"github.com/testground/sdk-go/runtime"
)

func main() {
	run.Invoke(pingpong)
}

func pingpong(runenv *runtime.RunEnv, initCtx *run.InitContext) error {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Second)
	defer cancel()

	client := initCtx.SyncClient
	netclient := initCtx.NetClient

	config := &network.Config{
		Network: "default", // Control the "default" network.
		Enable:  true,
		Default: network.LinkShape{
			Latency:   100 * time.Millisecond,
			Bandwidth: 1 << 20, // 1Mib
		},
		CallbackState: "network-configured",
		RoutingPolicy: network.DenyAll,
	}

	runenv.RecordMessage("before netclient.MustConfigureNetwork")
	netclient.MustConfigureNetwork(ctx, config)

	seq := client.MustSignalAndWait(ctx, "ip-allocation", runenv.TestInstanceCount)
	runenv.RecordMessage("I am %d", seq)

	ipC := byte((seq >> 8) + 1)
	ipD := byte(seq)

	config.IPv4 = runenv.TestSubnet
	config.IPv4.IP = append(config.IPv4.IP[0:2:2], ipC, ipD)
	config.CallbackState = "ip-changed"

	var (
		listener *net.TCPListener
		conn     *net.TCPConn
		err      error
	)

	if seq == 1 {
		listener, err = net.ListenTCP("tcp4", &net.TCPAddr{Port: 1234})
		if err != nil {
			return err
		}
		defer listener.Close()
	}

	runenv.RecordMessage("before reconfiguring network")
	netclient.MustConfigureNetwork(ctx, config)

	switch seq {
	case 1:
		conn, err = listener.AcceptTCP()
	case 2:
		conn, err = net.DialTCP("tcp4", nil, &net.TCPAddr{
			IP:   append(config.IPv4.IP[:3:3], 1),
			Port: 1234,
		})
	default:
		return fmt.Errorf("expected at most two test instances")
	}
	if err != nil {
		return err
	}

	defer conn.Close()

	// trying to measure latency here.
	err = conn.SetNoDelay(true)
	if err != nil {
		return err
	}

	runenv.RecordMessage("waiting until ready")
	buf := make([]byte, 1)

	// Wait till both sides are ready
	_, err = conn.Write([]byte{0})
	if err != nil {
		return err
	}

	_, err = conn.Read(buf)
	if err != nil {
		return err
	}

	start := time.Now()

	// write sequence number.
	runenv.RecordMessage("writing my id")
	_, err = conn.Write([]byte{byte(seq)})
	if err != nil {
		return err
	}

	// pong other sequence number
	runenv.RecordMessage("reading their id")
	_, err = conn.Read(buf)
	if err != nil {
		return err
	}

	runenv.RecordMessage("returning their id")
	_, err = conn.Write(buf)
	if err != nil {
		return err
	}

	runenv.RecordMessage("reading my id")
	// read our sequence number
	_, err = conn.Read(buf)
	if err != nil {
		return err
	}

	runenv.RecordMessage("done")

	// stop
	end := time.Now()

	// check the sequence number.
	if buf[0] != byte(seq) {
		return fmt.Errorf("read unexpected value")
	}

	rttMin := config.Default.Latency * 2
	rttMax := rttMin + 50*time.Millisecond

	// check the RTT
	rtt := end.Sub(start)
	if rtt < rttMin || rtt > rttMax {
		return fmt.Errorf("expected an RTT between %s and %s, got %s", rttMin, rttMax, rtt)
	}

	runenv.RecordMessage("ping RTT was %s [%s, %s]", rtt, rttMin, rttMax)
	return nil
}
