package wireguard

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tunnel"
	tt "github.com/tulle-net/tulle/tunnel/tuntest"
)

// The tests of this file each hold one finding of the review of the
// protocol against the whitepaper and wireguard-go (issue 25); each
// failed before its fix.

// quietFor fails if n receives anything within d.
func (n *node) quietFor(t *testing.T, d time.Duration, what string) {
	t.Helper()
	select {
	case f := <-n.out:
		t.Errorf("%s: received %x", what, f.Packet()[:min(40, len(f.Packet()))])
	case <-time.After(d):
	}
}

func sendTCP(t testing.TB, from *node, src, dst string, to netip.AddrPort) {
	t.Helper()
	pkt := tt.TCP(netip.MustParseAddr(src), netip.MustParseAddr(dst), 100)
	if err := from.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), to)}); err != nil {
		t.Error(err)
	}
}

// TestAllowedIPsBoundToKey: what a peer's key decrypts must come from that
// peer's subnets, what goes to a subnet is sealed only for its owner's
// key, and two peers claiming one endpoint (or one key) are both refused.
func TestAllowedIPsBoundToKey(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b, c := newNode(t, lo, Config{}), newNode(t, lo, Config{}), newNode(t, lo, Config{})
	net1, net2, net3 := netip.MustParsePrefix("100.96.1.0/24"), netip.MustParsePrefix("100.96.2.0/24"), netip.MustParsePrefix("100.96.3.0/24")
	a.tr.SetPeers([]PeerConfig{{Name: "b", Key: b.tr.PublicKey(), Endpoint: b.endpoint(), Subnets: []netip.Prefix{net2}}})
	b.tr.SetPeers([]PeerConfig{{Name: "a", Key: a.tr.PublicKey(), Endpoint: a.endpoint(), Subnets: []netip.Prefix{net1}}})
	sendTCP(t, a, "100.96.1.1", "100.96.2.1", b.endpoint())
	b.segments(t, 1)

	t.Run("source outside the sender's subnets", func(t *testing.T) {
		before := b.ctr.Get(DropAllowedIPs)
		sendTCP(t, a, "100.96.3.1", "100.96.2.1", b.endpoint()) // c's subnet, a's key
		b.quietFor(t, 300*time.Millisecond, "a packet from c's subnet under a's key")
		if b.ctr.Get(DropAllowedIPs) != before+1 {
			t.Errorf("%s = %d, want %d", DropAllowedIPs, b.ctr.Get(DropAllowedIPs), before+1)
		}
	})
	t.Run("destination outside the peer's subnets", func(t *testing.T) {
		before := a.ctr.Get(DropAllowedIPs)
		sendTCP(t, a, "100.96.1.1", "100.96.3.1", b.endpoint()) // to c's subnet, sealed for b
		b.quietFor(t, 300*time.Millisecond, "a packet for c's subnet sealed for b's key")
		if a.ctr.Get(DropAllowedIPs) != before+1 {
			t.Errorf("%s = %d, want %d", DropAllowedIPs, a.ctr.Get(DropAllowedIPs), before+1)
		}
	})
	t.Run("two peers claim one endpoint", func(t *testing.T) {
		// c publishes a's endpoint with its own key.
		b.tr.SetPeers([]PeerConfig{
			{Name: "a", Key: a.tr.PublicKey(), Endpoint: a.endpoint(), Subnets: []netip.Prefix{net1}},
			{Name: "c", Key: c.tr.PublicKey(), Endpoint: a.endpoint(), Subnets: []netip.Prefix{net3}},
		})
		if b.tr.Serves(a.endpoint()) {
			t.Error("the endpoint two peers claim is still served")
		}
		refused := 0
		for _, st := range b.tr.Status() {
			if st.Refused != "" {
				refused++
			}
		}
		if refused != 2 {
			t.Errorf("%d peers refused in the status, want both: %+v", refused, b.tr.Status())
		}
		sendTCP(t, b, "100.96.2.1", "100.96.1.1", a.endpoint())
		a.quietFor(t, 300*time.Millisecond, "a frame to the contested endpoint")
		// Sessions with the refused peers are gone: a's data is dropped.
		sendTCP(t, a, "100.96.1.1", "100.96.2.1", b.endpoint())
		b.quietFor(t, 300*time.Millisecond, "data from a refused peer")
	})
	t.Run("two peers claim one key", func(t *testing.T) {
		b.tr.SetPeers([]PeerConfig{
			{Name: "a", Key: a.tr.PublicKey(), Endpoint: a.endpoint(), Subnets: []netip.Prefix{net1}},
			{Name: "c", Key: a.tr.PublicKey(), Endpoint: c.endpoint(), Subnets: []netip.Prefix{net3}},
		})
		if b.tr.Serves(a.endpoint()) || b.tr.Serves(c.endpoint()) {
			t.Error("peers sharing a key are still served")
		}
	})
	t.Run("a peer with this node's own key", func(t *testing.T) {
		b.tr.SetPeers([]PeerConfig{{Name: "me", Key: b.tr.PublicKey(), Endpoint: c.endpoint(), Subnets: []netip.Prefix{net3}}})
		if b.tr.Serves(c.endpoint()) {
			t.Error("a peer carrying this node's own public key is served")
		}
	})
	t.Run("resolved", func(t *testing.T) {
		b.tr.SetPeers([]PeerConfig{{Name: "a", Key: a.tr.PublicKey(), Endpoint: a.endpoint(), Subnets: []netip.Prefix{net1}}})
		if !b.tr.Serves(a.endpoint()) {
			t.Fatal("a is not served once the conflict is gone")
		}
		sendTCP(t, b, "100.96.2.1", "100.96.1.1", a.endpoint())
		a.segments(t, 1)
	})
}

// shortTimers are the protocol's timers scaled down for tests.
var shortTimers = Timers{RekeyAfterTime: time.Hour, RejectAfterTime: 2 * time.Hour, RekeyAttemptTime: 10 * time.Second,
	RekeyTimeout: 300 * time.Millisecond, KeepaliveTimeout: 200 * time.Millisecond, RekeyAfterMessages: 1 << 60}

// TestOneWayFlowKeepalive: a receiver of a one-way flow answers with a
// passive keepalive KeepaliveTimeout after the first unanswered packet, so
// the sender never re-handshakes for want of an answer.
func TestOneWayFlowKeepalive(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{Timers: shortTimers}), newNode(t, lo, Config{Timers: shortTimers})
	session(t, a, b)
	before := settled(t, a, b, 2*shortTimers.RekeyTimeout) // past the start-up offers
	// 2 s of one-way traffic, 10× KeepaliveTimeout+RekeyTimeout.
	for range 100 {
		sendTCP(t, a, "100.96.1.1", "100.96.2.1", b.endpoint())
		time.Sleep(20 * time.Millisecond)
	}
	b.segments(t, 100)
	if got := a.ctr.Get(HandshakesSent) + b.ctr.Get(HandshakesSent) - before; got != 0 {
		t.Errorf("%d initiations during a one-way flow with a live session, want 0", got)
	}
	if b.ctr.Get(KeepalivesSent) < 5 {
		t.Errorf("the receiver sent %d keepalives in 2 s, want one per %v", b.ctr.Get(KeepalivesSent), shortTimers.KeepaliveTimeout)
	}
}

// rawPeer is a UDP socket posing as a peer that never answers.
type rawPeer struct {
	c   *net.UDPConn
	key Key
}

func newRawPeer(t *testing.T) *rawPeer {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawPeer{c: c, key: mustKey(t)}
}

func (r *rawPeer) endpoint() netip.AddrPort { return r.c.LocalAddr().(*net.UDPAddr).AddrPort() }

// initiations counts the initiations that arrive within d.
func (r *rawPeer) initiations(d time.Duration) int {
	n := 0
	buf := make([]byte, 2048)
	r.c.SetReadDeadline(time.Now().Add(d))
	for {
		k, _, err := r.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return n
		}
		if k == initiationSize && buf[0] == typeInitiation {
			n++
		}
	}
}

// TestOfferThenData: data that comes while the handshake offered to a new
// peer is in flight sends its own initiation, and the offer stays
// answerable: the peer answers the offer (and drops the second initiation
// as a flood), and that answer completes a session at once rather than
// landing on a forgotten index and leaving the data to the retry.
func TestOfferThenData(t *testing.T) {
	timers := Timers{RekeyAfterTime: time.Hour, RejectAfterTime: 2 * time.Hour, RekeyAttemptTime: time.Minute,
		RekeyTimeout: 3 * time.Second, KeepaliveTimeout: time.Second, RekeyAfterMessages: 1 << 60}
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{Timers: timers}), newNode(t, lo, Config{Timers: timers})
	b.tr.SetPeers([]PeerConfig{b.peer(a)})
	time.Sleep(eagerJitter + 50*time.Millisecond) // b's offer, which a drops: it does not know b yet
	a.tr.SetPeers([]PeerConfig{a.peer(b)})
	for a.ctr.Get(HandshakesSent) == 0 { // a's offer is out
	}
	sendTCP(t, a, "100.96.1.1", "100.96.2.1", b.endpoint())
	select {
	case <-b.out:
	case <-time.After(time.Second):
		t.Fatalf("data after an offer waits (a: %d initiations, %d unknown-index drops)", a.ctr.Get(HandshakesSent), a.ctr.Get(DropUnknownIndex))
	}
	if got := a.ctr.Get(DropUnknownIndex); got != 0 {
		t.Errorf("%s = %d: the offer's answer met a forgotten index", DropUnknownIndex, got)
	}
}

// TestOfferDroppedThenData: a peer that dropped the offer (the stock
// wireguard-go, which did not know this node yet and makes no offer of
// its own when it learns of it) gets data at once, not after the retry.
func TestOfferDroppedThenData(t *testing.T) {
	w := newWGDevice(t)
	a := newNode(t, netip.MustParseAddrPort("127.0.0.1:0"), Config{})
	wep := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), w.port)
	a.tr.SetPeers([]PeerConfig{{Name: "wg", Key: w.key.Public(), Endpoint: wep, Subnets: testNets}})
	for a.ctr.Get(HandshakesSent) == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // the offer reached wireguard-go, which dropped it
	w.addPeer(t, a.tr.PublicKey(), a.endpoint(), "100.96.1.0/24")
	sendTCP(t, a, "100.96.1.1", "100.96.2.1", wep)
	select {
	case <-w.tun.Inbound:
	case <-time.After(2 * time.Second):
		t.Fatal("data waits for the dropped offer's retry")
	}
}

// TestOneInitiationInFlight: with an initiation for data in flight, more
// data sends no second one within RekeyTimeout; the retry comes then.
func TestOneInitiationInFlight(t *testing.T) {
	a := newNode(t, netip.MustParseAddrPort("127.0.0.1:0"), Config{Timers: Timers{RekeyAfterTime: time.Hour, RejectAfterTime: 2 * time.Hour,
		RekeyAttemptTime: time.Minute, RekeyTimeout: 2 * time.Second, KeepaliveTimeout: time.Second, RekeyAfterMessages: 1 << 60}})
	r := newRawPeer(t)
	a.tr.SetPeers([]PeerConfig{{Name: "r", Key: r.key.Public(), Endpoint: r.endpoint(), Subnets: []netip.Prefix{netip.MustParsePrefix("100.96.2.0/24")}}})
	if n := r.initiations(eagerJitter + 100*time.Millisecond); n != 1 {
		t.Fatalf("%d initiations offered to a new peer, want 1", n)
	}
	sendTCP(t, a, "100.96.1.1", "100.96.2.1", r.endpoint())
	if n := r.initiations(200 * time.Millisecond); n != 1 {
		t.Errorf("%d initiations for data after the offer, want 1", n)
	}
	for range 5 {
		sendTCP(t, a, "100.96.1.1", "100.96.2.1", r.endpoint())
	}
	if n := r.initiations(time.Second); n != 0 {
		t.Errorf("%d more initiations within RekeyTimeout of the one for data, want 0", n)
	}
	if n := r.initiations(2 * time.Second); n != 1 {
		t.Errorf("%d retries at RekeyTimeout, want 1", n)
	}
}

// TestUnknownIndexNoHandshake: a transport message for an index this node
// does not have (spoofable from a peer's address) starts no handshake.
func TestUnknownIndexNoHandshake(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{Timers: shortTimers}), newNode(t, lo, Config{Timers: shortTimers})
	session(t, a, b)
	time.Sleep(2 * shortTimers.RekeyTimeout) // past the start-up offers
	before := b.ctr.Get(HandshakesSent)
	msg := forged(a, tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 60))
	binary.LittleEndian.PutUint32(msg[4:], binary.LittleEndian.Uint32(msg[4:])^0x5a5a5a5a)
	for range 3 {
		if _, err := a.tr.socks[0].Conn.WriteToUDPAddrPort(msg, b.endpoint()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * shortTimers.RekeyTimeout)
	}
	if got := b.ctr.Get(DropUnknownIndex); got != 3 {
		t.Errorf("%s = %d, want 3", DropUnknownIndex, got)
	}
	if got := b.ctr.Get(HandshakesSent) - before; got != 0 {
		t.Errorf("%d initiations triggered by unknown indices, want 0", got)
	}
}

// TestStagedAfterFlush: a frame staged after the staged frames were
// flushed for a new session (the sender saw no session, the handshake
// completed, then the frame was staged) leaves at once.
func TestStagedAfterFlush(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{}), newNode(t, lo, Config{})
	session(t, a, b)
	time.Sleep(eagerJitter + 100*time.Millisecond) // past the start-up offers
	pkt := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 100)
	f := frame(pkt, tt.PartialCsum(pkt), b.endpoint())
	a.tr.peers.Load().list[0].stage(&f) // as Send does when it saw no session
	select {
	case <-b.out:
	case <-time.After(time.Second):
		t.Fatalf("a frame staged while a session exists waits (%d staged)", len(a.tr.peers.Load().list[0].staged))
	}
}

// TestHandshakesAndDataConcurrently drives handshakes, data both ways,
// peer changes (endpoint and name moves hand sessions over) and status
// reads at once; under -race it sees every shared write. A scanner checks
// that no keypair is ever visible by its index without its keys.
func TestHandshakesAndDataConcurrently(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{}), newNode(t, lo, Config{})
	session(t, a, b)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loop := func(f func(i int)) {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				f(i)
			}
		})
	}
	drain := func(n *node) {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-n.out:
				}
			}
		})
	}
	drain(a)
	drain(b)
	loop(func(int) { sendTCP(t, a, "100.96.1.1", "100.96.2.1", b.endpoint()) })
	loop(func(int) { sendTCP(t, b, "100.96.2.1", "100.96.1.1", a.endpoint()) })
	loop(func(i int) {
		// Initiations from both ends, past the flood limit.
		for _, n := range []*node{a, b} {
			for _, p := range n.tr.peers.Load().list {
				p.mu.Lock()
				p.lastInit = 0
				p.mu.Unlock()
				n.tr.initiate(p, false, false)
			}
		}
		time.Sleep(2 * initiationMinInterval)
	})
	loop(func(i int) {
		// The same peer under another name: a new peer takes the
		// sessions over.
		c := b.peer(a)
		c.Name = fmt.Sprint("a", i%2)
		b.tr.SetPeers([]PeerConfig{c})
		b.tr.Status()
		time.Sleep(7 * time.Millisecond)
	})
	var bad string
	loop(func(int) {
		for _, n := range []*node{a, b} {
			n.tr.index.Range(func(_, v any) bool {
				if kp, ok := v.(*keypair); ok && (kp.send == nil || kp.recv == nil) && bad == "" {
					bad = "a keypair is visible by its index before its keys are set"
				}
				return true
			})
		}
	})
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	wg.Wait()
	if bad != "" {
		t.Error(bad)
	}
	if a.ctr.Get(HandshakesCompleted) < 10 {
		t.Errorf("only %d handshakes completed", a.ctr.Get(HandshakesCompleted))
	}
}

// TestRateLimiter: a flood of new sources neither resets the buckets of
// sources already limited nor grows the table past its bound; an IPv6
// host is limited by its /64; idle buckets are swept.
func TestRateLimiter(t *testing.T) {
	now := time.Now()
	var r rateLimiter
	exhaust := func(a netip.Addr) {
		t.Helper()
		for r.allow(a, now) {
		}
	}
	x := netip.MustParseAddr("198.18.0.7")
	exhaust(x)
	for i := range 5000 {
		r.allow(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), now)
	}
	if r.allow(x, now) {
		t.Error("5,000 new sources reset a limited source's bucket")
	}
	v6 := netip.MustParseAddr("fd00:96::1")
	exhaust(v6)
	if r.allow(netip.MustParseAddr("fd00:96::ffff:2"), now) {
		t.Error("another address of the same /64 is not limited with it")
	}
	if !r.allow(netip.MustParseAddr("fd00:96:0:1::1"), now) {
		t.Error("another /64 is limited")
	}
	for i := 0; len(r.buckets) < maxEntries; i++ {
		r.allow(netip.AddrFrom4([4]byte{198, 18, 128 + byte(i>>16), byte(i >> 8)}).Next(), now)
		r.allow(netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)}), now)
	}
	if r.allow(netip.MustParseAddr("198.19.255.254"), now) {
		t.Error("a new source is let in past maxEntries")
	}
	if len(r.buckets) > maxEntries {
		t.Errorf("%d buckets, bound %d", len(r.buckets), maxEntries)
	}
	later := now.Add(limiterIdle)
	if !r.allow(netip.MustParseAddr("198.19.255.254"), later) {
		t.Error("a new source is refused after the idle buckets were swept")
	}
	if len(r.buckets) != 1 {
		t.Errorf("%d buckets after the sweep, want 1", len(r.buckets))
	}
}

// TestUnderLoadLingers: the node stays under load for underLoadAfter after
// its handshake queue drains.
func TestUnderLoadLingers(t *testing.T) {
	tr := &Transport{hsq: make(chan hsMessage, handshakeQueue)}
	now := mono()
	if tr.underLoad(now) {
		t.Fatal("under load with an empty queue")
	}
	for range handshakeQueue / 8 {
		tr.hsq <- hsMessage{}
	}
	if !tr.underLoad(now) {
		t.Fatal("not under load with the queue an eighth full")
	}
	for len(tr.hsq) > 0 {
		<-tr.hsq
	}
	if !tr.underLoad(now + int64(underLoadAfter) - 1) {
		t.Error("the queue drained and the load was forgotten at once")
	}
	if tr.underLoad(now + int64(underLoadAfter)) {
		t.Error("still under load a second after the queue drained")
	}
}

// TestEndKeyGrace: after a rotation the old key answers initiations for
// its grace; EndKeyGrace (tullectl rotate-key --now) ends that at once.
func TestEndKeyGrace(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{Timers: shortTimers}), newNode(t, lo, Config{Timers: shortTimers})
	session(t, a, b)
	b.tr.SetPrivateKey(mustKey(t))
	b.tr.EndKeyGrace()
	before := b.ctr.Get(DropMAC1)
	time.Sleep(2 * shortTimers.RekeyTimeout)
	p := a.tr.peers.Load().list[0] // still the old key
	a.tr.initiate(p, false, false)
	for deadline := time.Now().Add(5 * time.Second); b.ctr.Get(DropMAC1) == before; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("an initiation to the retired key was not refused")
		}
	}
	if b.ctr.Get(HandshakesCompleted) != 1 && b.ctr.Get(HandshakesCompleted) != 2 {
		t.Errorf("b completed %d handshakes: one with the retired key after its grace ended", b.ctr.Get(HandshakesCompleted))
	}
}

// TestVet: which peers SetPeers (the transport's and the device's) refuse.
func TestVet(t *testing.T) {
	k := func(b byte) Key { return Key{b} }
	ep := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), port) }
	mapped := netip.AddrPortFrom(netip.MustParseAddr("::ffff:198.18.0.1"), 1)
	tests := []struct {
		name    string
		cfgs    []PeerConfig
		ok      []string
		refused []string
	}{
		{"distinct", []PeerConfig{{Name: "a", Key: k(1), Endpoint: ep(1)}, {Name: "b", Key: k(2), Endpoint: ep(2)}}, []string{"a", "b"}, nil},
		{"one endpoint", []PeerConfig{{Name: "a", Key: k(1), Endpoint: ep(1)}, {Name: "b", Key: k(2), Endpoint: ep(1)}, {Name: "c", Key: k(3), Endpoint: ep(3)}}, []string{"c"}, []string{"a", "b"}},
		{"one endpoint, 4in6", []PeerConfig{{Name: "a", Key: k(1), Endpoint: ep(1)}, {Name: "b", Key: k(2), Endpoint: mapped}}, nil, []string{"a", "b"}},
		{"one key", []PeerConfig{{Name: "a", Key: k(1), Endpoint: ep(1)}, {Name: "b", Key: k(1), Endpoint: ep(2)}}, nil, []string{"a", "b"}},
		{"own key", []PeerConfig{{Name: "a", Key: k(9), Endpoint: ep(1)}, {Name: "b", Key: k(2), Endpoint: ep(2)}}, []string{"b"}, []string{"a"}},
		{"no key or endpoint: skipped", []PeerConfig{{Name: "a", Endpoint: ep(1)}, {Name: "b", Key: k(2)}}, nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ok, refused := vet(tc.cfgs, []Key{k(9)})
			var gotOK, gotRefused []string
			for _, c := range ok {
				gotOK = append(gotOK, c.Name)
			}
			for _, r := range refused {
				if r.Refused == "" {
					t.Errorf("%s refused without a reason", r.Name)
				}
				gotRefused = append(gotRefused, r.Name)
			}
			if fmt.Sprint(gotOK) != fmt.Sprint(tc.ok) || fmt.Sprint(gotRefused) != fmt.Sprint(tc.refused) {
				t.Errorf("served %v refused %v, want %v and %v", gotOK, gotRefused, tc.ok, tc.refused)
			}
		})
	}
}

// settled waits until neither node has sent a handshake initiation for
// quiet (the offers each makes to a new peer, and their retries, are
// over: on a loaded machine they can come late) and returns how many
// both have sent.
func settled(t *testing.T, a, b *node, quiet time.Duration) uint64 {
	t.Helper()
	sent := func() uint64 { return a.ctr.Get(HandshakesSent) + b.ctr.Get(HandshakesSent) }
	deadline := time.Now().Add(10 * time.Second)
	n := sent()
	for {
		time.Sleep(quiet)
		m := sent()
		if m == n {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("handshake initiations still going on after 10 s (%d)", m)
		}
		n = m
	}
}
