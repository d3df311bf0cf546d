package udp

import (
	"bytes"
	"io"
	"log/slog"
	"net/netip"
	"testing"

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
