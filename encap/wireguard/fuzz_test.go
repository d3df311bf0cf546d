package wireguard

import (
	"net/netip"
	"testing"
	"time"

	tt "github.com/tulle-net/tulle/tunnel/tuntest"
)

// FuzzReceive feeds arbitrary datagrams to a receiver that holds a live
// session, and runs the handshake messages among them through the
// handshake handlers: nothing may panic, and what comes out is only what
// authenticated. Seeds: a valid transport message, initiation, response
// and cookie reply, so the fuzzer starts inside every handler.
func FuzzReceive(f *testing.F) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(f, lo, Config{}), newNode(f, lo, Config{})
	session(f, a, b)
	inner := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 100)
	f.Add(forged(a, inner))
	bkm, akm := b.tr.keys.Load(), a.tr.keys.Load()
	var init [initiationSize]byte
	var hs handshake
	ss, _ := dh(akm.priv, bkm.pub)
	createInitiation(init[:], &hs, akm, bkm.pub, ss, 9, time.Now())
	putMACs(init[:], bkm.mac1Key, nil)
	f.Add(init[:])
	var resp [responseSize]byte
	in, err := consumeInitiation(init[:], bkm, func(Key) ([32]byte, bool) { return ss, true })
	if err != nil {
		f.Fatal(err)
	}
	createResponse(resp[:], &in.hs, akm.pub, Key{}, 11)
	putMACs(resp[:], akm.mac1Key, nil)
	f.Add(resp[:])
	var cookie [cookieSize]byte
	var jar cookieJar
	jar.createCookieReply(cookie[:], init[:], bkm, lo, time.Now())
	f.Add(cookie[:])
	f.Add([]byte{4, 0, 0, 0})

	r := newReceiver(b.tr, b.tr.socks[0])
	src := netip.MustParseAddrPort("127.0.0.1:9")
	f.Fuzz(func(t *testing.T, dg []byte) {
		if len(dg) > 65535 {
			return
		}
		buf := make([]byte, 32+len(dg))
		copy(buf[32:], dg)
		r.buf = buf
		r.pend, r.pi = r.pend[:0], 0
		r.datagram(32, buf[32:], src, mono())
		for _, p := range r.pend {
			if p.off+p.n > len(buf) || ipLen(buf[p.off:p.off+p.n]) != p.n {
				t.Fatalf("pending packet outside the datagram: %+v", p)
			}
		}
		for len(b.tr.hsq) > 0 {
			select {
			case m := <-b.tr.hsq:
				b.tr.handle(&m)
			default:
			}
		}
	})
}
