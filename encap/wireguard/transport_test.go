package wireguard

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/tulle-net/tulle/tunnel"
	tt "github.com/tulle-net/tulle/tunnel/tuntest"
)

var quiet = slog.New(slog.DiscardHandler)

// node is a Transport under test with its receivers feeding a channel.
type node struct {
	tr  *Transport
	ctr *Counters
	out chan tunnel.Frame
}

func newNode(t testing.TB, local netip.AddrPort, cfg Config) *node {
	t.Helper()
	if cfg.PrivateKey.IsZero() {
		cfg.PrivateKey, _ = NewPrivateKey()
	}
	n := &node{ctr: &Counters{}, out: make(chan tunnel.Frame, 1024)}
	cfg.Counters, cfg.Logger, cfg.MTU = n.ctr, quiet, 1500
	if local.Addr().Is4() {
		cfg.Local4 = local
	} else {
		cfg.Local6 = local
	}
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n.tr = tr
	t.Cleanup(func() { tr.Close() })
	for _, recv := range tr.Receivers() {
		go func() {
			frames := make([]tunnel.Frame, tunnel.RxBatch)
			for {
				k, err := recv(frames)
				if err != nil {
					return
				}
				for _, f := range frames[:k] {
					c := f
					c.Buf = append([]byte(nil), f.Buf...)
					n.out <- c
				}
			}
		}()
	}
	return n
}

func (n *node) endpoint() netip.AddrPort { return n.tr.LocalAddrs()[0] }

// testNets are the subnets the tests' peers own: all of the test ranges.
var testNets = []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd00::/8")}

func (n *node) peer(o *node) PeerConfig {
	return PeerConfig{Name: "peer", Key: o.tr.PublicKey(), Endpoint: o.endpoint(), Subnets: testNets}
}

// segments collects what n receives until it adds up to want's segments.
func (n *node) segments(t testing.TB, want int) [][]byte {
	t.Helper()
	var got [][]byte
	deadline := time.After(10 * time.Second)
	for len(got) < want {
		select {
		case f := <-n.out:
			got = append(got, tt.Segments(t, f.Packet(), f.Offload)...)
		case <-deadline:
			m := map[string]uint64{}
			n.ctr.SnapshotInto(m)
			for k, v := range m {
				if v == 0 {
					delete(m, k)
				}
			}
			t.Fatalf("%s received %d of %d segments; its counters: %v", n.endpoint(), len(got), want, m)
		}
	}
	return got
}

func sameSegments(t testing.TB, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d segments, want %d", len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("segment %d differs:\n got %x\nwant %x", i, got[i][:min(60, len(got[i]))], want[i][:min(60, len(want[i]))])
		}
	}
}

func frame(pkt []byte, o tunnel.Offload, to netip.AddrPort) tunnel.Frame {
	buf := make([]byte, tunnel.BufSize)
	n := copy(buf[tunnel.Headroom:], pkt)
	return tunnel.Frame{Buf: buf[:tunnel.Headroom+n], Off: tunnel.Headroom, Offload: o, Addr: to}
}

// TestTransport: two transports handshake on the first frame and carry TSO
// super-packets (cut, sealed, opened, merged) and plain packets, both
// families; the receiver sees exactly the wire segments of what was sent.
func TestTransport(t *testing.T) {
	for _, fam := range []struct {
		name     string
		lo       string
		src, dst netip.Addr
		mss      int
	}{
		{"v4", "127.0.0.1:0", netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 1400},
		{"v6", "[::1]:0", netip.MustParseAddr("fd00:96:1::1"), netip.MustParseAddr("fd00:96:2::1"), 1360},
	} {
		t.Run(fam.name, func(t *testing.T) {
			a := newNode(t, netip.MustParseAddrPort(fam.lo), Config{})
			b := newNode(t, netip.MustParseAddrPort(fam.lo), Config{})
			a.tr.SetPeers([]PeerConfig{a.peer(b)})
			b.tr.SetPeers([]PeerConfig{b.peer(a)})
			for _, size := range []int{60000, 100, 1000, 20000} {
				pkt := tt.TCP(fam.src, fam.dst, size)
				o := tt.TSO(pkt, fam.mss)
				if size <= fam.mss {
					o = tt.PartialCsum(pkt)
				}
				want := tt.Segments(t, pkt, o)
				if err := a.tr.Send([]tunnel.Frame{frame(pkt, o, b.endpoint())}); err != nil {
					t.Fatal(err)
				}
				sameSegments(t, b.segments(t, len(want)), want)
			}
			// And back: b's session is confirmed by now.
			pkt := tt.TCP(fam.dst, fam.src, 30000)
			o := tt.TSO(pkt, fam.mss)
			want := tt.Segments(t, pkt, o)
			a.tr.Send(nil)
			if err := b.tr.Send([]tunnel.Frame{frame(pkt, o, a.endpoint())}); err != nil {
				t.Fatal(err)
			}
			sameSegments(t, a.segments(t, len(want)), want)
			if c := b.ctr.Get(Coalesced); c == 0 {
				t.Errorf("nothing coalesced on receive")
			}
			for _, n := range []*node{a, b} {
				for _, c := range []Counter{DropAuth, DropReplay, DropMalformed, DropUnknownIndex, DropNotIP} {
					if v := n.ctr.Get(c); v != 0 {
						t.Errorf("%s = %d", c, v)
					}
				}
			}
			// One handshake, or two where both ends' start-up offers crossed.
			if ha, hb := a.ctr.Get(HandshakesCompleted), b.ctr.Get(HandshakesCompleted); ha < 1 || ha > 2 || hb < 1 || hb > 2 {
				t.Errorf("handshakes completed %d/%d, want 1 or 2 each", ha, hb)
			}
		})
	}
}

// wgDevice is the stock wireguard-go device on loopback, over a channel TUN.
type wgDevice struct {
	dev  *device.Device
	tun  *tuntest.ChannelTUN
	key  Key
	port uint16
}

func newWGDevice(t *testing.T) *wgDevice {
	t.Helper()
	w := &wgDevice{tun: tuntest.NewChannelTUN()}
	w.key, _ = NewPrivateKey()
	w.dev = device.NewDevice(w.tun.TUN(), conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	if err := w.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", hex.EncodeToString(w.key[:]))); err != nil {
		t.Fatal(err)
	}
	if err := w.dev.Up(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.dev.Close)
	cfg, err := w.dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Sscanf(cfg[bytes.Index([]byte(cfg), []byte("listen_port="))+len("listen_port="):], "%d", &w.port); err != nil {
		t.Fatalf("listen port in %q: %v", cfg, err)
	}
	return w
}

func (w *wgDevice) addPeer(t *testing.T, pub Key, ep netip.AddrPort, allowed ...string) {
	t.Helper()
	s := fmt.Sprintf("public_key=%s\nendpoint=%s\n", hex.EncodeToString(pub[:]), ep)
	for _, a := range allowed {
		s += "allowed_ip=" + a + "\n"
	}
	if err := w.dev.IpcSet(s); err != nil {
		t.Fatal(err)
	}
}

// interopPair is a wireguard-go device and a tulle transport, peers of
// each other (tulle's subnet 100.96.1.0/24 on wireguard-go's side), and
// wireguard-go's endpoint.
func interopPair(t *testing.T) (*wgDevice, *node, netip.AddrPort) {
	t.Helper()
	w := newWGDevice(t)
	a := newNode(t, netip.MustParseAddrPort("127.0.0.1:0"), Config{})
	wep := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), w.port)
	a.tr.SetPeers([]PeerConfig{{Name: "wg", Key: w.key.Public(), Endpoint: wep, Subnets: testNets}})
	w.addPeer(t, a.tr.PublicKey(), a.endpoint(), "100.96.1.0/24")
	return w, a, wep
}

// TestInteropWireguardGo: tulle's WireGuard and the stock wireguard-go
// device exchange traffic both ways, each side initiating once, TSO
// super-packets from tulle arriving as the segments wireguard-go writes
// to its TUN.
func TestInteropWireguardGo(t *testing.T) {
	for _, first := range []string{"tulle", "wireguard-go"} {
		t.Run(first+" initiates", func(t *testing.T) {
			w, a, wep := interopPair(t)
			src, dst := netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1")

			toTulle := func() {
				t.Helper()
				pkt := tt.TCP(dst, src, 1000)
				finish(pkt)
				w.tun.Outbound <- pkt
				got := a.segments(t, 1)
				sameSegments(t, got, [][]byte{pkt})
			}
			if first == "wireguard-go" {
				toTulle()
			}
			pkt := tt.TCP(src, dst, 30000)
			o := tt.TSO(pkt, 1400)
			want := tt.Segments(t, pkt, o)
			if err := a.tr.Send([]tunnel.Frame{frame(pkt, o, wep)}); err != nil {
				t.Fatal(err)
			}
			var got [][]byte
			deadline := time.After(10 * time.Second)
			for len(got) < len(want) {
				select {
				case p := <-w.tun.Inbound:
					got = append(got, p)
				case <-deadline:
					t.Fatalf("wireguard-go received %d of %d packets", len(got), len(want))
				}
			}
			sameSegments(t, got, want)
			toTulle()
			if first == "tulle" && a.ctr.Get(HandshakesSent) == 0 {
				t.Errorf("tulle sent no initiation")
			}
		})
	}
}

// finish completes a packet's partial checksum (tuntest.TCP leaves it
// for a device).
func finish(pkt []byte) {
	segs, _ := tunnel.NewSegments(pkt, tt.PartialCsum(pkt))
	segs.Next(pkt)
}

// TestInteropOneWayFlow: a one-way flow for 60 s between tulle and the
// stock wireguard-go, each way, needs no handshake beyond the first: the
// receiver answers with passive keepalives (KeepaliveTimeout after the
// first unanswered packet), so the sender never re-handshakes for want
// of an answer (it would after KeepaliveTimeout+RekeyTimeout, 15 s);
// the 2-minute rekey is past the end.
func TestInteropOneWayFlow(t *testing.T) {
	if testing.Short() {
		t.Skip("60 s of traffic each way (-short)")
	}
	const flow = 60 * time.Second
	for _, sender := range []string{"tulle", "wireguard-go"} {
		t.Run(sender+" sends", func(t *testing.T) {
			t.Parallel()
			w, a, wep := interopPair(t)
			src, dst := netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1")
			send := func() {
				if sender == "tulle" {
					pkt := tt.TCP(src, dst, 100)
					if err := a.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), wep)}); err != nil {
						t.Error(err)
					}
					<-w.tun.Inbound
					return
				}
				pkt := tt.TCP(dst, src, 100)
				finish(pkt)
				w.tun.Outbound <- pkt
				a.segments(t, 1)
			}
			send()
			time.Sleep(time.Second) // past the start-up offer
			before := a.ctr.Get(HandshakesCompleted)
			n := 0
			for start := time.Now(); time.Since(start) < flow; time.Sleep(50 * time.Millisecond) {
				send()
				n++
			}
			if got := a.ctr.Get(HandshakesCompleted) - before; got != 0 {
				t.Errorf("%d handshakes during %s of one-way traffic (%d packets), want 0", got, flow, n)
			}
			if sender == "wireguard-go" && a.ctr.Get(KeepalivesSent) < 5 {
				t.Errorf("tulle, receiving, sent %d keepalives in %s", a.ctr.Get(KeepalivesSent), flow)
			}
			t.Logf("%d packets over %s; tulle: %d handshakes, %d keepalives sent, %d received", n, flow,
				a.ctr.Get(HandshakesCompleted), a.ctr.Get(KeepalivesSent), a.ctr.Get(KeepalivesReceived))
		})
	}
}
