package wireguard

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tunnel"
	tt "github.com/tulle-net/tulle/tunnel/tuntest"
)

// session sets up a and b with each other as peers and waits until both
// hold a confirmed session.
func session(t testing.TB, a, b *node) {
	t.Helper()
	a.tr.SetPeers([]PeerConfig{a.peer(b)})
	b.tr.SetPeers([]PeerConfig{b.peer(a)})
	pkt := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 100)
	if err := a.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), b.endpoint())}); err != nil {
		t.Fatal(err)
	}
	b.segments(t, 1)
}

// forged returns a valid transport message from a to b carrying pkt.
func forged(a *node, pkt []byte) []byte {
	kp := a.tr.peers.Load().list[0].cur.Load()
	m := make([]byte, HeaderLen+padded(len(pkt))+TagLen)
	copy(m[HeaderLen:], pkt)
	n := newSender(a.tr).message(m, kp, padded(len(pkt)))
	return m[:n]
}

// TestBadInput: what is not a well-formed, authenticated message from a
// peer is dropped, counted by reason, and never answered.
func TestBadInput(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{}), newNode(t, lo, Config{})
	session(t, a, b)
	stranger := newKeyMaterial(mustKey(t))
	bkm := b.tr.keys.Load()

	attacker, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(lo))
	if err != nil {
		t.Fatal(err)
	}
	defer attacker.Close()
	// An authenticated message moves the peer's endpoint to where it came
	// from (WireGuard's roaming): the genuine ones come from another socket,
	// so the attacker's sees only what b says to strangers (nothing).
	roamer, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(lo))
	if err != nil {
		t.Fatal(err)
	}
	defer roamer.Close()
	inner := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 60)
	valid := forged(a, inner)
	corrupt := append([]byte(nil), forged(a, inner)...)
	corrupt[len(corrupt)-1] ^= 1

	// An initiation from a key b does not know, with a good mac1.
	var unknownInit [initiationSize]byte
	var hs handshake
	ss, _ := dh(stranger.priv, bkm.pub)
	if err := createInitiation(unknownInit[:], &hs, stranger, bkm.pub, ss, 7, time.Now()); err != nil {
		t.Fatal(err)
	}
	putMACs(unknownInit[:], bkm.mac1Key, nil)
	badMAC := unknownInit
	badMAC[120] ^= 1
	notIP := forged(a, make([]byte, 32)) // authenticated, but no IP packet

	unknownIndex := append([]byte(nil), valid...)
	binary.LittleEndian.PutUint32(unknownIndex[4:], binary.LittleEndian.Uint32(valid[4:])+1)

	tests := []struct {
		name string
		msg  []byte
		ctr  Counter
		from *net.UDPConn
	}{
		{"empty type", []byte{0, 0, 0, 0, 1, 2, 3}, DropMalformed, nil},
		{"unknown type", []byte{9, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}, DropMalformed, nil},
		{"reserved bytes set", append([]byte{4, 1, 0, 0}, valid[4:]...), DropMalformed, nil},
		{"short transport", valid[:20], DropMalformed, nil},
		{"short initiation", unknownInit[:100], DropMalformed, nil},
		{"unknown index", unknownIndex, DropUnknownIndex, nil},
		{"bad tag", corrupt, DropAuth, nil},
		{"bad mac1", badMAC[:], DropMAC1, nil},
		{"unknown key", unknownInit[:], DropUnknownKey, nil},
		{"not IP inside", notIP, DropNotIP, roamer}, // authentic: it comes from the peer
		{"valid", valid, -1, roamer},
		{"replayed", valid, DropReplay, attacker},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var before uint64
			if tc.ctr >= 0 {
				before = b.ctr.Get(tc.ctr)
			}
			from := tc.from
			if from == nil {
				from = attacker
			}
			if _, err := from.WriteToUDPAddrPort(tc.msg, b.endpoint()); err != nil {
				t.Fatal(err)
			}
			if tc.ctr < 0 {
				b.segments(t, 1)
				return
			}
			for deadline := time.Now().Add(5 * time.Second); b.ctr.Get(tc.ctr) == before; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("%s not counted", tc.ctr)
				}
			}
			select {
			case f := <-b.out:
				t.Fatalf("a frame came through: %x", f.Packet())
			default:
			}
		})
	}
	attacker.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := attacker.ReadFromUDPAddrPort(make([]byte, 2000)); err == nil {
		t.Errorf("b answered the attacker with %d bytes", n)
	}
}

func mustKey(t *testing.T) Key {
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestRekey: with short timers, sessions are renewed again and again
// under traffic both ways and no packet is lost to a rekey.
func TestRekey(t *testing.T) {
	timers := Timers{RekeyAfterTime: 300 * time.Millisecond, RejectAfterTime: 2 * time.Second, RekeyAttemptTime: 2 * time.Second,
		RekeyTimeout: 150 * time.Millisecond, KeepaliveTimeout: 400 * time.Millisecond, RekeyAfterMessages: 1 << 60}
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{Timers: timers}), newNode(t, lo, Config{Timers: timers})
	session(t, a, b)
	src, dst := netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1")
	const n = 100
	for range n {
		pkt := tt.TCP(src, dst, 200)
		if err := a.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), b.endpoint())}); err != nil {
			t.Fatal(err)
		}
		back := tt.TCP(dst, src, 200)
		if err := b.tr.Send([]tunnel.Frame{frame(back, tt.PartialCsum(back), a.endpoint())}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.segments(t, n)
	a.segments(t, n)
	if got := a.ctr.Get(HandshakesCompleted) + b.ctr.Get(HandshakesCompleted); got < 6 {
		t.Errorf("%d handshakes in 2 s with a 300 ms rekey", got)
	}
	for _, x := range []*node{a, b} {
		for _, c := range []Counter{DropAuth, DropReplay, DropExpired, DropUnknownIndex, DropStaged} {
			if v := x.ctr.Get(c); v != 0 {
				t.Errorf("%s = %d", c, v)
			}
		}
	}
}

func TestReplayFilter(t *testing.T) {
	var f replayFilter
	for _, tc := range []struct {
		c    uint64
		want bool
	}{{0, true}, {0, false}, {1, true}, {5, true}, {3, true}, {3, false}, {windowSize + 10, true}, {9, false}, {11, true}, {10, true},
		{1 << 20, true}, {1<<20 - windowSize - 1, false}, {1<<20 - windowSize + 1, true}, {rejectAfterMessages, false}} {
		if got := f.accept(tc.c); got != tc.want {
			t.Errorf("accept(%d) = %v, want %v", tc.c, got, tc.want)
		}
	}
}

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "sub", "wg.key")
	k, created, err := LoadOrCreateKey(p)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	k2, created, err := LoadOrCreateKey(p)
	if err != nil || created || k2 != k {
		t.Fatalf("reload: created %v, same %v, %v", created, k2 == k, err)
	}
	os.Chmod(p, 0o644)
	if _, _, err := LoadOrCreateKey(p); err == nil || !strings.Contains(err.Error(), "0644") {
		t.Errorf("a world-readable key was accepted: %v", err)
	}
	bad := filepath.Join(dir, "bad.key")
	os.WriteFile(bad, []byte("not a key\n"), 0o600)
	if _, _, err := LoadOrCreateKey(bad); err == nil || !strings.Contains(err.Error(), "base64") {
		t.Errorf("malformed key: %v", err)
	}
	short := filepath.Join(dir, "short.key")
	os.WriteFile(short, []byte("AAAA\n"), 0o600)
	if _, err := ReadKeyFile(short); err == nil || !strings.Contains(err.Error(), "3 bytes") {
		t.Errorf("short key: %v", err)
	}
	psk := filepath.Join(dir, "psk")
	os.WriteFile(psk, []byte(k.String()+"\n"), 0o644)
	if got, err := ReadPSKFile(psk); err != nil || got != k {
		t.Errorf("psk: %v", err)
	}
}

// TestPresharedKey: peers with the same PSK talk; a peer with another
// PSK never completes a handshake.
func TestPresharedKey(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	psk := mustKey(t)
	a, b := newNode(t, lo, Config{PresharedKey: psk}), newNode(t, lo, Config{PresharedKey: psk})
	session(t, a, b)
	c := newNode(t, lo, Config{PresharedKey: mustKey(t)})
	a.tr.SetPeers([]PeerConfig{a.peer(b), a.peer(c)})
	c.tr.SetPeers([]PeerConfig{c.peer(a)})
	pkt := tt.TCP(netip.MustParseAddr("100.96.3.1"), netip.MustParseAddr("100.96.1.1"), 100)
	c.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), a.endpoint())})
	for deadline := time.Now().Add(5 * time.Second); c.ctr.Get(DropAuth) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("c's handshake with another PSK was not refused")
		}
	}
	// A responder counts a handshake when it answers (a offers one to c,
	// a new peer, at any moment): only a transport message would confirm
	// it, and across PSKs none opens. So: nothing c sends reaches a.
	for range 3 {
		c.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), a.endpoint())})
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case f := <-a.out:
		t.Errorf("a delivered a frame from c across different PSKs (%d bytes)", len(f.Buf)-f.Off)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestAllocs: sealing a super-packet into a GSO train and opening a
// message allocate nothing.
func TestAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{}), newNode(t, lo, Config{})
	session(t, a, b)
	// b's own start-up offer may have made a the responder of a newer
	// session, which a may not send on until b has: so b sends once.
	back := tt.TCP(netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 100)
	if err := b.tr.Send([]tunnel.Frame{frame(back, tt.PartialCsum(back), a.endpoint())}); err != nil {
		t.Fatal(err)
	}
	a.segments(t, 1)
	pkt := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 60000)
	fs := []tunnel.Frame{frame(pkt, tt.TSO(pkt, 1400), b.endpoint())}
	if n := leastAllocs(func() { a.tr.Send(fs) }); n != 0 {
		t.Errorf("Send: %.1f allocations per super-packet", n)
	}
	r := newReceiver(b.tr, b.tr.socks[0])
	inner := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 1000)
	msgs := make([][]byte, 60)
	for i := range msgs {
		msgs[i] = append(make([]byte, 32), forged(a, inner)...)
	}
	src := a.endpoint()
	i := 0
	if n := leastAllocs(func() {
		r.buf, r.pend, r.pi = msgs[i%len(msgs)], r.pend[:0], 0
		r.datagram(32, msgs[i%len(msgs)][32:], src, mono())
		i++
	}); n != 0 {
		t.Errorf("receive: %.1f allocations per message", n)
	}
}

// leastAllocs is testing.AllocsPerRun(50, f), tried up to 5 times for
// the least: it counts the whole process's allocations, and the nodes'
// own goroutines (handshake and keepalive timers) allocate now and then
// — on a loaded machine, sometimes during a run. A path that allocates
// shows in every try.
func leastAllocs(f func()) float64 {
	least := testing.AllocsPerRun(50, f)
	for range 4 {
		if least == 0 {
			break
		}
		least = min(least, testing.AllocsPerRun(50, f))
	}
	return least
}

// TestKeyRotation: b rotates its key. Traffic keeps flowing both ways on
// the sessions it had; a, still knowing only the old key, completes a
// handshake (answered under the old key's grace); once a learns the new
// key the sessions carry on and a handshake with the new key completes.
func TestKeyRotation(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	a, b := newNode(t, lo, Config{}), newNode(t, lo, Config{})
	session(t, a, b)
	src, dst := netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1")
	exchange := func(when string) {
		t.Helper()
		pkt := tt.TCP(src, dst, 100)
		a.tr.Send([]tunnel.Frame{frame(pkt, tt.PartialCsum(pkt), b.endpoint())})
		b.segments(t, 1)
		back := tt.TCP(dst, src, 100)
		b.tr.Send([]tunnel.Frame{frame(back, tt.PartialCsum(back), a.endpoint())})
		a.segments(t, 1)
	}
	b.tr.SetPrivateKey(mustKey(t))
	exchange("after the rotation, on the old sessions")
	handshake := func(n *node, peer Key) {
		t.Helper()
		before := n.ctr.Get(HandshakesCompleted)
		pp := n.tr.peers.Load().byKey[peer]
		// Past the handshakes a start offers (eagerJitter) and the
		// flood limit, which would rightly drop an initiation this soon.
		time.Sleep(eagerJitter + 2*initiationMinInterval)
		pp.mu.Lock()
		pp.lastInit = 0
		pp.mu.Unlock()
		n.tr.initiate(pp, false, false)
		for deadline := time.Now().Add(5 * time.Second); n.ctr.Get(HandshakesCompleted) == before; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				m := map[string]uint64{}
				b.ctr.SnapshotInto(m)
				t.Fatalf("no handshake; b: %v", m)
			}
		}
	}
	oldKey := a.tr.peers.Load().list[0].pub
	handshake(a, oldKey) // to the old key: answered in its grace
	exchange("after a handshake to the old key")
	a.tr.SetPeers([]PeerConfig{a.peer(b)}) // the lease: new key, same node
	exchange("after a learned the new key")
	handshake(a, b.tr.PublicKey())
	exchange("after a handshake to the new key")
	if v := a.ctr.Get(DropStaged) + b.ctr.Get(DropStaged); v != 0 {
		t.Errorf("%d frames dropped", v)
	}
}

// TestStagingBounded: frames for peers that never answer are staged up
// to 16 per peer and 8 MiB in all, then dropped and counted.
func TestStagingBounded(t *testing.T) {
	a := newNode(t, netip.MustParseAddrPort("127.0.0.1:0"), Config{})
	var peers []PeerConfig
	for i := range 300 {
		peers = append(peers, PeerConfig{Name: fmt.Sprint("silent", i), Key: mustKey(t).Public(), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(20000+i)), Subnets: testNets})
	}
	a.tr.SetPeers(peers)
	pkt := tt.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 60000)
	for round := range 20 {
		for _, p := range peers {
			a.tr.Send([]tunnel.Frame{frame(pkt, tt.TSO(pkt, 1400), p.Endpoint)})
		}
		if got := a.tr.stagedBytes.Load(); got > maxStagedBytes {
			t.Fatalf("round %d: %d bytes staged, bound %d", round, got, maxStagedBytes)
		}
	}
	if a.ctr.Get(DropStaged) == 0 {
		t.Error("nothing dropped past the bound")
	}
	a.tr.SetPeers(nil)
	if got := a.tr.stagedBytes.Load(); got != 0 {
		t.Errorf("%d bytes still staged after every peer left", got)
	}
}
