package wireguard

import (
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tunnel"
	tt "github.com/tulle-net/tulle/tunnel/tuntest"
)

// BenchmarkSend seals a 64 KB TSO super-packet (MSS 1400) into a UDP GSO
// train and sends it to a peer on loopback.
func BenchmarkSend(b *testing.B) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	x, y := newNode(b, lo, Config{}), newNode(b, lo, Config{})
	session(b, x, y)
	go func() {
		for range y.out {
		}
	}()
	pkt := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 64000)
	fs := []tunnel.Frame{frame(pkt, tt.TSO(pkt, 1400), y.endpoint())}
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		if err := x.tr.Send(fs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpen opens transport messages of 1400-byte packets as the
// receive loop does (index lookup, AEAD, replay window, the peer's
// allowed IPs), without the socket.
func BenchmarkOpen(b *testing.B) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	x, y := newNode(b, lo, Config{}), newNode(b, lo, Config{})
	session(b, x, y)
	r := newReceiver(y.tr, y.tr.socks[0])
	inner := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 1400-40)
	const batch = 4096
	msgs := make([][]byte, batch)
	src := x.endpoint()
	s := newSender(x.tr) // one: each holds a 1 MiB slab
	kp := x.tr.peers.Load().list[0].cur.Load()
	pl := padded(len(inner))
	b.SetBytes(int64(len(inner)))
	i := batch
	for b.Loop() {
		if i == batch {
			b.StopTimer()
			for j := range msgs {
				if msgs[j] == nil {
					msgs[j] = make([]byte, 32+HeaderLen+pl+TagLen)
				}
				m := msgs[j][32:]
				clear(m)
				copy(m[HeaderLen:], inner)
				s.message(m, kp, pl)
			}
			i = 0
			b.StartTimer()
		}
		r.buf, r.pend, r.pi = msgs[i], r.pend[:0], 0
		r.datagram(32, msgs[i][32:], src, mono())
		i++
	}
	if len(r.pend) != 1 {
		b.Fatalf("the last message was not opened (%d pending)", len(r.pend))
	}
}
