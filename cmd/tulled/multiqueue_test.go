package main

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
)

// TestMultiQueue runs tulled with four TUN queues, so four tx loops read
// the device at once: 16 UDP flows of numbered datagrams sent together all
// arrive in order (the kernel keeps a flow on one queue, tulled writes a
// flow's replies through that queue), beside TCP transfers that stay
// intact. A restart onto an existing device of the other queue mode keeps
// the device (pods route through it) and carries traffic.
func TestMultiQueue(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{Args: []string{"--tun-queues", "4"}})
	a, b := c.Nodes[0], c.Nodes[1]
	if n := txQueues(t, a); n != 4 {
		t.Fatalf("tulle0 has %d queues, want 4", n)
	}
	dst := addr(t, b, false)

	var wg sync.WaitGroup
	for _, v6 := range []bool{false, true} {
		wg.Go(func() {
			if sent, got := transfer(t, a, b, addr(t, b, v6), 50<<20, 0); sent != got {
				t.Errorf("TCP transfer beside the UDP flows corrupted (IPv6: %v)", v6)
			}
		})
	}
	orderedFlows(t, a, b, dst, 16, 3000)
	wg.Wait()

	// The device outlives tulled; a restart asking for one queue attaches
	// to the four-queue device as it is, and the reverse.
	for _, q := range []string{"1", "4"} {
		if err := a.Stop(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		a.Extra = []string{"--tun-queues", q}
		if err := a.Start(); err != nil {
			t.Fatal(err)
		}
		if err := a.WaitPeers(context.Background(), 1); err != nil {
			t.Fatal(err)
		}
		ping(t, a, dst)
		orderedFlows(t, a, b, dst, 4, 500)
	}
	if n := txQueues(t, a); n != 4 {
		t.Errorf("after restarts tulle0 has %d queues, want 4 (the device kept)", n)
	}
}

// txQueues counts the TUN's queues as the kernel shows them.
func txQueues(t *testing.T, n *cluster.Node) int {
	t.Helper()
	out, err := n.Run("ls", "/sys/class/net/tulle0/queues")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(out, "tx-")
}

// orderedFlows sends perFlow numbered datagrams on each of flows UDP flows
// from a to dst at once and checks that each flow arrives in order. Loss
// is tolerated (a TUN queue drops when full); reordering is not.
func orderedFlows(t *testing.T, a, b *cluster.Node, dst netip.Addr, flows, perFlow int) {
	t.Helper()
	var rc *net.UDPConn
	if err := b.Do(func() (err error) {
		rc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	rc.SetReadBuffer(8 << 20)
	to := rc.LocalAddr().(*net.UDPAddr)

	type result struct{ got, reordered int }
	results := make(chan map[int]result, 1)
	go func() {
		last := map[int]int{}
		res := map[int]result{}
		buf := make([]byte, 2048)
		for {
			rc.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, _, err := rc.ReadFromUDPAddrPort(buf)
			if err != nil {
				results <- res
				return
			}
			if n < 8 {
				continue
			}
			f, seq := int(binary.BigEndian.Uint32(buf)), int(binary.BigEndian.Uint32(buf[4:]))
			r := res[f]
			r.got++
			if prev, ok := last[f]; ok && seq <= prev {
				r.reordered++
			}
			last[f] = seq
			res[f] = r
		}
	}()

	var wg sync.WaitGroup
	for f := range flows {
		var sc *net.UDPConn
		if err := a.Do(func() (err error) { sc, err = net.DialUDP("udp", nil, to); return err }); err != nil {
			t.Fatal(err)
		}
		defer sc.Close()
		wg.Go(func() {
			d := make([]byte, 1200)
			binary.BigEndian.PutUint32(d, uint32(f))
			for seq := range perFlow {
				binary.BigEndian.PutUint32(d[4:], uint32(seq))
				sc.Write(d)
				if seq%8 == 7 {
					time.Sleep(time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	res := <-results
	total := 0
	for f := range flows {
		r := res[f]
		total += r.got
		if r.reordered > 0 {
			t.Errorf("flow %d: %d of %d datagrams arrived out of order", f, r.reordered, r.got)
		}
		if r.got == 0 {
			t.Errorf("flow %d: nothing arrived", f)
		}
	}
	t.Logf("%d flows × %d datagrams: %d arrived (%.1f%%), none reordered", flows, perFlow, total, 100*float64(total)/float64(flows*perFlow))
	if total < flows*perFlow/4 {
		t.Errorf("only %d of %d datagrams arrived", total, flows*perFlow)
	}
}

// TestSparseFlowsQueue: beside a bulk transfer, a ping travels through the
// sparse flows' queue at both ends and the sparse socket (the mechanisms
// that keep it out of the bulk stream's ring and out of the receive
// buffer behind it, asserted by the counters rather than by a time), and
// the transfer does not: after its first milliseconds it moves to a bulk
// queue.
func TestSparseFlowsQueue(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	a, b := c.Nodes[0], c.Nodes[1]
	if n := txQueues(t, a); n < 2 {
		t.Fatalf("tulle0 has %d queues by default, want the sparse flows' one and at least one more", n)
	}
	dst := addr(t, b, false)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if sent, got := transfer(t, a, b, dst, 400<<20, 0); sent != got {
			t.Error("the bulk transfer arrived corrupted")
		}
	}()
	waitCounter(t, a, "tx_bytes", 20<<20) // the transfer is under way
	before := map[*cluster.Node]map[string]uint64{}
	names := []string{"tx_sparse_frames", "rx_sparse_frames", "tx_frames", "sparse_datagrams_in"}
	for _, n := range []*cluster.Node{a, b} {
		before[n] = map[string]uint64{}
		for _, k := range names {
			before[n][k] = counter(t, n, k)
		}
	}
	if out, err := a.Run("ping", "-n", "-c", "20", "-i", "0.02", "-W", "2", dst.String()); err != nil {
		t.Fatalf("ping beside the transfer: %v\n%s", err, out)
	}
	delta := func(n *cluster.Node, k string) uint64 { return counter(t, n, k) - before[n][k] }
	// Requests: read from a's sparse queue, written on b's; replies the
	// other way. The first request may leave by the kernel's hash.
	for _, x := range []struct {
		n *cluster.Node
		k string
	}{{a, "tx_sparse_frames"}, {b, "sparse_datagrams_in"}, {b, "rx_sparse_frames"}, {b, "tx_sparse_frames"}, {a, "sparse_datagrams_in"}, {a, "rx_sparse_frames"}} {
		if d := delta(x.n, x.k); d < 19 {
			t.Errorf("%s: %s moved by %d during 20 pings, want at least 19", x.n.Name, x.k, d)
		}
	}
	<-done
	if s, all := counter(t, b, "sparse_datagrams_in"), counter(t, b, "datagrams_in"); s*4 > all {
		t.Errorf("%s: %d of %d datagrams arrived on the sparse socket: the bulk transfer's did", b.Name, s, all)
	}
	if s, all := counter(t, a, "tx_sparse_frames"), counter(t, a, "tx_frames"); s*4 > all {
		t.Errorf("%s: %d of %d frames left through the sparse queue: the bulk transfer stayed there", a.Name, s, all)
	}
}
