package tunnel_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap/udp"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

var (
	subnetA = netip.MustParsePrefix("100.96.1.0/24")
	subnetB = netip.MustParsePrefix("100.96.2.0/24")
	podA    = netip.MustParseAddr("100.96.1.7")
	podB    = netip.MustParseAddr("100.96.2.9")
	podA6   = netip.MustParseAddr("fd00:96:0:1::7")
	podB6   = netip.MustParseAddr("fd00:96:0:2::9")
	subA6   = netip.MustParsePrefix("fd00:96:0:1::/64")
	subB6   = netip.MustParsePrefix("fd00:96:0:2::/64")
)

// node is one side of a two-node datapath on loopback: a channel TUN and a
// real UDP transport, so GSO, GRO and recvmmsg are the kernel's own.
type node struct {
	tun   *tuntest.ChanTUN
	mq    *tuntest.MultiChanTUN // the device when it has queues; tun is its queue 0
	tr    *udp.Transport
	peers *tunnel.PeerTable
	ctr   *tunnel.Counters
	uctr  *udp.Counters // the transport's
	addr  netip.AddrPort
	clock func() int64 // the flow classes' clock (nil: the wall clock)
	aqm   bool         // the AQM on (tests that count every packet keep it off)
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newNode(t *testing.T, ip string, local ...netip.Prefix) *node {
	t.Helper()
	n := &node{tun: tuntest.NewChanTUN(), peers: tunnel.NewPeerTable(local), ctr: &tunnel.Counters{}, uctr: &udp.Counters{}}
	tr, err := udp.New(udp.Options{
		Local4:   netip.AddrPortFrom(netip.MustParseAddr(ip), 0),
		MTU:      1500,
		Accept:   func(a netip.AddrPort) bool { return n.peers.ByAddr(a) != nil },
		Counters: n.uctr,
		Logger:   quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	n.tr = tr
	n.addr = tr.LocalAddrs()[0]
	return n
}

func (n *node) run(t *testing.T) {
	var dev tunnel.Device = n.tun
	if n.mq != nil {
		dev = n.mq
	}
	dp := tunnel.NewDatapath(tunnel.Config{Device: dev, Transport: n.tr, Peers: n.peers, Counters: n.ctr, MTU: udp.InnerMTU(1500, false), Logger: quiet(), Clock: n.clock, NoAQM: !n.aqm})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dp.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("datapath: %v", err)
		}
	})
}

// pair returns two running nodes that know each other.
func pair(t *testing.T) (a, b *node) { return pairQueues(t, 1) }

func frozen() int64 { return int64(time.Hour) }

// pairQueues is pair with devices of nq queues.
func pairQueues(t *testing.T, nq int) (a, b *node) {
	a = newNode(t, "127.0.0.1", subnetA, subA6)
	b = newNode(t, "127.0.0.3", subnetB, subB6)
	if nq > 1 {
		a.mq, b.mq = tuntest.NewMultiChanTUN(nq), tuntest.NewMultiChanTUN(nq)
		a.tun, b.tun = a.mq.ChanTUN, b.mq.ChanTUN
		// One frozen instant: a flow's class follows its bytes alone, not
		// how fast this machine moves them.
		a.clock, b.clock = frozen, frozen
	}
	a.peers.Set([]netip.Prefix{subnetA, subA6}, []tunnel.Peer{{Name: "b", Addr: b.addr, Subnets: []netip.Prefix{subnetB, subB6}}})
	b.peers.Set([]netip.Prefix{subnetB, subB6}, []tunnel.Peer{{Name: "a", Addr: a.addr, Subnets: []netip.Prefix{subnetA, subA6}}})
	a.run(t)
	b.run(t)
	return a, b
}

func recvPacket(t *testing.T, c chan tuntest.Packet) tuntest.Packet {
	t.Helper()
	select {
	case p := <-c:
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet came out of the far TUN")
	}
	return tuntest.Packet{}
}

func expectNone(t *testing.T, c chan tuntest.Packet) {
	t.Helper()
	select {
	case p := <-c:
		t.Fatalf("unexpected packet out of TUN: % x", p.Data[:min(len(p.Data), 40)])
	case <-time.After(200 * time.Millisecond):
	}
}

func waitCounter[K interface {
	~int
	String() string
}](t *testing.T, c interface{ Get(K) uint64 }, k K, want uint64) {
	t.Helper()
	waitFor(t, func() bool { return c.Get(k) >= want }, func() string { return fmt.Sprintf("counter %s = %d, want ≥ %d", k, c.Get(k), want) })
}

// waitFor polls cond until it holds, failing with what() after 5 s.
func waitFor(t *testing.T, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(what())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// receiveSegments reads packets out of a TUN until they amount to
// len(want) wire segments, and checks that these are want.
func receiveSegments(t *testing.T, c chan tuntest.Packet, want [][]byte) {
	t.Helper()
	var got [][]byte
	for len(got) < len(want) {
		p := recvPacket(t, c)
		got = append(got, tuntest.Segments(t, p.Data, p.Offload)...)
	}
	if len(got) != len(want) {
		t.Fatalf("%d segments came out, want %d", len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("segment %d of %d changed in transit", i, len(want))
		}
	}
}

func TestDatapathCarriesFramesIntact(t *testing.T) {
	a, b := pair(t)
	tests := []struct {
		name string
		pkt  []byte
		off  func([]byte) tunnel.Offload
	}{
		{"plain IPv4", tuntest.TCP(podA, podB, 100), func([]byte) tunnel.Offload { return tunnel.Offload{} }},
		{"partial csum IPv4", tuntest.TCP(podA, podB, 1400), tuntest.PartialCsum},
		{"full-MTU plain", tuntest.TCP(podA, podB, 1456-40), func([]byte) tunnel.Offload { return tunnel.Offload{} }},
		{"TSO IPv4 super-packet", tuntest.TCP(podA, podB, 62000), func(p []byte) tunnel.Offload { return tuntest.TSO(p, 1404) }},
		{"TSO IPv6 super-packet", tuntest.TCP(podA6, podB6, 60000), func(p []byte) tunnel.Offload { return tuntest.TSO(p, 1384) }},
		{"two-datagram frame", tuntest.TCP(podA, podB, 2000), func(p []byte) tunnel.Offload { return tuntest.TSO(p, 1000) }},
		{"max IPv4 packet", tuntest.TCP(podA, podB, 65535-40), func(p []byte) tunnel.Offload { return tuntest.TSO(p, 1404) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := tt.off(tt.pkt)
			a.tun.Inbound <- tuntest.Packet{Data: tt.pkt, Offload: o}
			if o.GSOType != tunnel.GSONone {
				// Cut along its segments and merged again: the far
				// kernel must end up with the very same segments.
				receiveSegments(t, b.tun.Outbound, tuntest.Segments(t, tt.pkt, o))
				return
			}
			got := recvPacket(t, b.tun.Outbound)
			if !bytes.Equal(got.Data, tt.pkt) {
				t.Fatalf("packet changed in transit: got %d bytes, want %d", len(got.Data), len(tt.pkt))
			}
			if got.Offload != tt.off(tt.pkt) {
				t.Errorf("offload = %+v, want %+v", got.Offload, tt.off(tt.pkt))
			}
		})
	}
	// A burst of super-packets exercises batching, GRO and in-place
	// reassembly across several frames per recvmmsg.
	const burst = 200
	pkt := tuntest.TCP(podA, podB, 50000)
	go func() {
		for range burst {
			a.tun.Inbound <- tuntest.Packet{Data: pkt, Offload: tuntest.TSO(pkt, 1404)}
		}
	}()
	one := tuntest.Segments(t, pkt, tuntest.TSO(pkt, 1404))
	var want [][]byte
	for range burst {
		want = append(want, one...)
	}
	receiveSegments(t, b.tun.Outbound, want)
	if d := b.uctr.Get(udp.DropIncomplete) + b.uctr.Get(udp.DropBadHeader); d != 0 {
		t.Errorf("%d frames dropped on loopback", d)
	}
}

func TestDatapathDropsAndCounts(t *testing.T) {
	a, b := pair(t)

	// Spoofed inner source: a sends a packet claiming a source outside its subnet.
	spoof := tuntest.TCP(netip.MustParseAddr("100.96.77.1"), podB, 10)
	a.tun.Inbound <- tuntest.Packet{Data: spoof}
	waitCounter(t, b.ctr, tunnel.DropSpoofed, 1)

	// Destination owned by nobody.
	a.tun.Inbound <- tuntest.Packet{Data: tuntest.TCP(podA, netip.MustParseAddr("100.96.200.1"), 10)}
	waitCounter(t, a.ctr, tunnel.DropNoRoute, 1)

	// Not an IP packet.
	a.tun.Inbound <- tuntest.Packet{Data: []byte{0x00, 1, 2}}
	waitCounter(t, a.ctr, tunnel.DropMalformed, 1)

	// Datagrams from an address that is no peer's, well-formed or not.
	intruder, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer intruder.Close()
	valid := append([]byte{udp.Version<<4 | udp.TypePacket, 2, 0, 0, 0, 1, 0, 0}, tuntest.TCP(podA, podB, 10)...)
	for _, d := range [][]byte{valid, {1, 2, 3}} {
		if _, err := intruder.WriteToUDPAddrPort(d, b.addr); err != nil {
			t.Fatal(err)
		}
	}
	waitCounter(t, b.uctr, udp.DropUnknownSource, 2)

	// From a's host but not a's port (any process there): dropped before
	// any state, like a stranger.
	other, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.addr.Addr(), 0)), net.UDPAddrFromAddrPort(b.addr))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Write(valid); err != nil {
		t.Fatal(err)
	}
	waitCounter(t, b.uctr, udp.DropUnknownSource, 3)

	// From a known peer's endpoint (a third peer c that the test plays),
	// garbage: bad version, bad header, bad offload.
	raw, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 4)}, net.UDPAddrFromAddrPort(b.addr))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	subnetC := netip.MustParsePrefix("100.96.3.0/24")
	b.peers.Set([]netip.Prefix{subnetB, subB6}, []tunnel.Peer{
		{Name: "a", Addr: a.addr, Subnets: []netip.Prefix{subnetA, subA6}},
		{Name: "c", Addr: raw.LocalAddr().(*net.UDPAddr).AddrPort(), Subnets: []netip.Prefix{subnetC}},
	})
	fromC := netip.MustParseAddr("100.96.3.5")
	badOffload := append([]byte{udp.Version<<4 | udp.TypeFrame, 2, 0, 9, 0, 1, 0, 0, tunnel.FlagNeedsCsum, tunnel.GSOTCPv6, 5, 0, 0, 20, 0, 16}, tuntest.TCP(fromC, podB, 10)...)
	for _, d := range [][]byte{{0x21, 2, 0, 0, 0, 1, 0, 0}, {0x12, 1}, {0x17, 2, 0, 0, 0, 1, 0, 0}, badOffload} {
		if _, err := raw.Write(d); err != nil {
			t.Fatal(err)
		}
	}
	waitCounter(t, b.uctr, udp.DropBadVersion, 1)
	waitCounter(t, b.uctr, udp.DropBadHeader, 2)
	waitFor(t, func() bool { return b.tun.Refused() >= 1 }, func() string { return "the write with bad offload metadata was not refused" })
	expectNone(t, b.tun.Outbound)
	if r := b.tun.Refused(); r != 1 {
		t.Errorf("refused %d writes with bad offload metadata, want 1", r)
	}

	// Still forwarding after all that.
	ok := tuntest.TCP(podA, podB, 10)
	a.tun.Inbound <- tuntest.Packet{Data: ok}
	if got := recvPacket(t, b.tun.Outbound); !bytes.Equal(got.Data, ok) {
		t.Error("good packet after bad input corrupted")
	}
}

func TestDatapathTooBig(t *testing.T) {
	a, b := pair(t)
	mtu := udp.InnerMTU(1500, false)

	// IPv4 with DF, above the MTU: an ICMP "fragmentation needed" goes back
	// into a's TUN, from a's subnet address, quoting the packet.
	big := tuntest.TCP(podA, podB, mtu)
	a.tun.Inbound <- tuntest.Packet{Data: big}
	icmp := recvPacket(t, a.tun.Outbound)
	if icmp.Data[9] != 1 || icmp.Data[20] != 3 || icmp.Data[21] != 4 {
		t.Fatalf("not an ICMP frag-needed: % x", icmp.Data[:24])
	}
	if got := int(binary.BigEndian.Uint16(icmp.Data[26:])); got != mtu {
		t.Errorf("ICMP announces MTU %d, want %d", got, mtu)
	}
	if src := netip.AddrFrom4([4]byte(icmp.Data[12:16])); src != subnetA.Addr() {
		t.Errorf("ICMP from %s, want %s", src, subnetA.Addr())
	}
	if dst := netip.AddrFrom4([4]byte(icmp.Data[16:20])); dst != podA {
		t.Errorf("ICMP to %s, want %s", dst, podA)
	}
	expectNone(t, b.tun.Outbound)

	// IPv6 is never fragmented on the way: ICMPv6 packet too big.
	big6 := tuntest.TCP(podA6, podB6, mtu)
	a.tun.Inbound <- tuntest.Packet{Data: big6}
	icmp6 := recvPacket(t, a.tun.Outbound)
	if icmp6.Data[6] != 58 || icmp6.Data[40] != 2 {
		t.Fatalf("not an ICMPv6 packet too big: % x", icmp6.Data[:44])
	}
	if got := int(binary.BigEndian.Uint32(icmp6.Data[44:])); got != mtu {
		t.Errorf("ICMPv6 announces MTU %d, want %d", got, mtu)
	}

	// IPv4 without DF is carried whole across several datagrams.
	noDF := tuntest.TCP(podA, podB, mtu)
	noDF[6] = 0
	a.tun.Inbound <- tuntest.Packet{Data: noDF}
	if got := recvPacket(t, b.tun.Outbound); !bytes.Equal(got.Data, noDF) {
		t.Error("non-DF oversized packet not carried intact")
	}
	if n := a.ctr.Get(tunnel.ICMPTooBigSent); n != 2 {
		t.Errorf("icmp_too_big_sent = %d, want 2", n)
	}
}

// TestDatapathMultiQueue: with four device queues, one tx loop per queue
// sends at once (the transport's Send is shared), and the receiving side
// writes each flow in order through the sparse queue (0) while it is
// sparse and then through one bulk queue, always the same: each flow's
// packets on the sparse queue all come before those on its bulk queue,
// and neither queue reorders them. The flows spread over the bulk queues.
// The kernel then reads each flow's replies from that queue, so a flow
// moves between tx loops at most on a class change.
func TestDatapathMultiQueue(t *testing.T) {
	const nq, flows, perFlow = 4, 16, 400
	a, b := pairQueues(t, nq)
	// The clock is frozen, so a flow newly bulk leaves b's sparse queue
	// only once that queue's loop is seen idle: wait until it has started.
	waitFor(t, func() bool { return b.mq.Queue[0].Waiting() > 0 }, func() string { return "b's sparse queue loop never read" })
	mk := func(flow, seq int) tuntest.Packet {
		p := tuntest.TCP(podA, podB, 300)
		binary.BigEndian.PutUint16(p[20:], uint16(40000+flow))
		binary.BigEndian.PutUint32(p[24:], uint32(seq)) // not contiguous: never merged
		return tuntest.Packet{Data: p}
	}
	for q := range nq {
		go func() {
			for seq := range perFlow {
				for f := q; f < flows; f += nq { // the kernel steers flow f to queue f%nq
					a.mq.Queue[q].Inbound <- mk(f, seq)
				}
			}
		}()
	}
	got := make(chan [3]int, 64) // queue, flow, seq
	for q := range nq {
		go func() {
			for p := range b.mq.Queue[q].Outbound {
				got <- [3]int{q, int(binary.BigEndian.Uint16(p.Data[20:])) - 40000, int(binary.BigEndian.Uint32(p.Data[24:]))}
			}
		}()
	}
	seqs := map[[2]int][]int{} // flow, queue → sequence numbers in the order written
	for n := range flows * perFlow {
		select {
		case r := <-got:
			seqs[[2]int{r[1], r[0]}] = append(seqs[[2]int{r[1], r[0]}], r[2])
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d packets came out", n, flows*perFlow)
		}
	}
	used := map[int]bool{}
	for f := range flows {
		var order []int // the sparse queue's, then the bulk queue's
		bulk := -1
		for q := range nq {
			s := seqs[[2]int{f, q}]
			if q == 0 || len(s) == 0 {
				continue
			}
			if bulk >= 0 {
				t.Fatalf("flow %d written through bulk queues %d and %d", f, bulk, q)
			}
			bulk = q
			used[q] = true
		}
		order = append(order, seqs[[2]int{f, 0}]...)
		if bulk >= 0 {
			order = append(order, seqs[[2]int{f, bulk}]...)
		} else {
			t.Errorf("flow %d (%d packets of 300 B, back to back) was never bulk", f, perFlow)
		}
		for i, seq := range order {
			if seq != i {
				t.Fatalf("flow %d: packet %d written %dth (sparse queue %d packets, then queue %d): reordered or lost", f, seq, i, len(seqs[[2]int{f, 0}]), bulk)
			}
		}
	}
	if len(used) < 2 {
		t.Errorf("%d flows were all written through %d bulk queue(s)", flows, len(used))
	}
}

// TestDatapathAQM: a queue that is never drained gets the AQM's signal at
// CoDel's pace, on the batch's largest frame, and the receiver gets every
// other segment intact. The clock steps one millisecond per batch (the tx
// loop reads it once per batch), so the 50 full batches span 50 ms:
// signals at the 23rd (2 ms above target + 20 ms) and the 43rd read.
func TestDatapathAQM(t *testing.T) {
	a := newNode(t, "127.0.0.1", subnetA)
	b := newNode(t, "127.0.0.3", subnetB)
	var clk atomic.Int64
	clk.Store(int64(time.Hour))
	a.aqm, a.clock = true, func() int64 { return clk.Add(int64(time.Millisecond)) }
	const batches, mss = 50, 300
	var want [][]byte
	for i := range batches * tunnel.BatchSize {
		p := tuntest.TCP(podA, podB, 3*mss)
		binary.BigEndian.PutUint32(p[24:], uint32(i*3*mss)) // one stream
		o := tuntest.TSO(p, mss)
		segs := tuntest.Segments(t, p, o)
		if i == 22*tunnel.BatchSize || i == 42*tunnel.BatchSize {
			segs = segs[:2] // the first (largest, first of equals) frame of reads 23 and 43 loses its last segment
		}
		want = append(want, segs...)
		a.tun.Inbound <- tuntest.Packet{Data: p, Offload: o}
	}
	a.peers.Set([]netip.Prefix{subnetA}, []tunnel.Peer{{Name: "b", Addr: b.addr, Subnets: []netip.Prefix{subnetB}}})
	b.peers.Set([]netip.Prefix{subnetB}, []tunnel.Peer{{Name: "a", Addr: a.addr, Subnets: []netip.Prefix{subnetA}}})
	a.run(t)
	b.run(t)
	receiveSegments(t, b.tun.Outbound, want)
	if got := a.ctr.Get(tunnel.AQMTrims); got != 2 {
		t.Errorf("%d trims, want 2", got)
	}
	if got := a.ctr.Get(tunnel.AQMMarks) + a.ctr.Get(tunnel.AQMDrops); got != 0 {
		t.Errorf("%d marks or drops, want none", got)
	}
	// Drained reads from now on: no more signals, however long it runs.
	for range 100 {
		a.tun.Inbound <- tuntest.Packet{Data: tuntest.TCP(podA, podB, 10)}
		recvPacket(t, b.tun.Outbound)
	}
	if got := a.ctr.Get(tunnel.AQMTrims) + a.ctr.Get(tunnel.AQMDrops); got != 2 {
		t.Errorf("%d signals after the queue drained, want still 2", got)
	}
}
