package udp

import (
	"bytes"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// loopbackPair returns a sender and a receiver transport on 127.0.0.1.
func loopbackPair(tb testing.TB) (tx, rx *Transport, dst netip.AddrPort) {
	tb.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var err error
	tx, err = New(Options{Local4: netip.MustParseAddrPort("127.0.0.1:0"), MTU: 1500, Logger: log})
	if err != nil {
		tb.Fatal(err)
	}
	rx, err = New(Options{Local4: netip.MustParseAddrPort("127.0.0.1:0"), MTU: 1500, Logger: log})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tx.Close(); rx.Close() })
	return tx, rx, rx.LocalAddrs()[0]
}

// BenchmarkTrainLoopback sends 62 KB TSO frames through real sockets on
// loopback (UDP GSO out, UDP GRO in) and reassembles them: the transport's
// cost without the TUN. Allocations reported are per frame.
func BenchmarkTrainLoopback(b *testing.B) {
	tx, rx, dst := loopbackPair(b)
	pkt := tuntest.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 62000)
	f := []tunnel.Frame{{Buf: append(make([]byte, tunnel.Headroom), pkt...), Off: tunnel.Headroom, Offload: tuntest.TSO(pkt, 1400), Addr: dst}}
	recv := rx.Receivers()[0]
	out := make([]tunnel.Frame, 16)
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for b.Loop() {
		if err := tx.Send(f); err != nil {
			b.Fatal(err)
		}
		n, err := recv(out)
		if err != nil || n != 1 || len(out[0].Packet()) != len(pkt) {
			b.Fatalf("received %d frames, %v", n, err)
		}
	}
}

func TestTransportLoopbackIPv6(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tx, err := New(Options{Local6: netip.MustParseAddrPort("[::1]:0"), MTU: 1500, Logger: log})
	if err != nil {
		testenv.Skip(t, "no IPv6 loopback: %v", err)
	}
	defer tx.Close()
	rx, err := New(Options{Local6: netip.MustParseAddrPort("[::1]:0"), MTU: 1500, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	pkt := tuntest.TCP(netip.MustParseAddr("fd00:96::1"), netip.MustParseAddr("fd00:96:0:1::1"), 40000)
	f := []tunnel.Frame{{Buf: append(make([]byte, tunnel.Headroom), pkt...), Off: tunnel.Headroom, Offload: tuntest.TSO(pkt, 1380), Addr: rx.LocalAddrs()[0]}}
	if err := tx.Send(f); err != nil {
		t.Fatal(err)
	}
	out := make([]tunnel.Frame, 4)
	n, err := rx.Receivers()[0](out)
	if err != nil || n != 1 {
		t.Fatalf("received %d frames: %v", n, err)
	}
	if !bytes.Equal(out[0].Packet(), pkt) || out[0].Addr != tx.LocalAddrs()[0] {
		t.Errorf("frame changed over the IPv6 underlay (from %s)", out[0].Addr)
	}
}

// TestSparseSocket: a frame the tx loop read from the sparse queue leaves
// flagged from the sparse socket and is read by the receiver's sparse
// loop; every other frame by the first.
func TestSparseSocket(t *testing.T) {
	tx, rx, dst := loopbackPair(t)
	recvs := rx.Receivers()
	if len(recvs) != 2 {
		t.Fatalf("%d receivers, want 2 (the first socket's and the sparse one's)", len(recvs))
	}
	mk := func(n int, sparse bool) tunnel.Frame {
		pkt := tuntest.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), n)
		return tunnel.Frame{Buf: append(make([]byte, tunnel.Headroom), pkt...), Off: tunnel.Headroom, Offload: tuntest.PartialCsum(pkt), Addr: dst, Sparse: sparse}
	}
	big := mk(6000, true) // a super-packet read from the sparse queue: cut, every piece flagged
	big.Offload = tuntest.TSO(big.Packet(), 1400)
	if err := tx.Send([]tunnel.Frame{mk(100, true), mk(300, false), mk(40, true)}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Send([]tunnel.Frame{big}); err != nil {
		t.Fatal(err)
	}
	// Each receiver reads until it holds what it should, or fails after 5 s
	// (closing the transport releases it).
	got := make([][]int, 2)
	done := make(chan int, 2)
	for i := range recvs {
		go func() {
			defer func() { done <- i }()
			out := make([]tunnel.Frame, 8)
			for sum(got[i]) < []int{300, 100 + 40 + 6000}[i] {
				n, err := recvs[i](out)
				if err != nil {
					return
				}
				for _, f := range out[:n] {
					got[i] = append(got[i], len(f.Packet())-40) // TCP payload bytes
				}
			}
		}()
	}
	timeout := time.After(5 * time.Second)
	for range recvs {
		select {
		case <-done:
		case <-timeout:
			rx.Close()
			<-done
		}
	}
	if want := []int{300}; !slices.Equal(got[0], want) {
		t.Errorf("first socket's receiver read packets of %v payload bytes, want %v", got[0], want)
	}
	if sum(got[1]) != 100+40+6000 || len(got[1]) < 3 || got[1][0] != 100 || got[1][1] != 40 {
		t.Errorf("sparse socket's receiver read packets of %v payload bytes, want 100, 40, then 6000 in one or more pieces", got[1])
	}
	if got := rx.ctr.Get(SparseIn); got < 3 {
		t.Errorf("sparse_datagrams_in %d, want the two packets' and the super-packet's pieces", got)
	}
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}
