package wireguard

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/crypto/blake2s"

	"github.com/tulle-net/tulle/tunnel"
)

// peer is one remote node: its key, where it is, its sessions and the
// timestamps the timers read. Its name, key, configured endpoint and
// allowed subnets never change: SetPeers makes a new peer that takes the
// sessions over when one of them does.
type peer struct {
	t           *Transport
	name        string
	pub         Key
	cfgEndpoint netip.AddrPort
	// allowed are its subnets (WireGuard's allowed IPs): what its key may
	// send from, and what is sealed for its key.
	allowed  []netip.Prefix
	endpoint atomic.Pointer[netip.AddrPort]
	mac1Key  [32]byte
	static   atomic.Pointer[staticDH]

	// cur is the session data is sent with (lock-free on the hot path).
	cur atomic.Pointer[keypair]

	mu sync.Mutex // everything below
	// prev is the session before cur (still received on); next is a
	// session we responded to, used once the initiator's first message
	// on it confirms it.
	prev, next *keypair
	hs         handshake // our initiation in flight
	// offered: hs is an offer (see Transport.SetPeers), made before any
	// data waited for it. Data that comes while it is in flight sends its
	// own initiation at once (the peer may have dropped the offer: it did
	// not know this node yet), and the offer moves to offerHS, answerable
	// until offerUntil (mono): its answer never meets a forgotten index.
	offered    bool
	offerHS    handshake
	offerUntil int64
	attempt    int64 // mono: when the current handshake attempt began (0: none)
	// lastInit is when our last handshake message left: an initiation,
	// or a response (answering counts as sending one, as in wireguard-go:
	// no initiation of ours crosses a handshake just made).
	lastInit int64
	retryAt  int64 // mono: when the initiation in flight is retransmitted
	// Responder state: the greatest initiation timestamp consumed and
	// when (replay and flood protection).
	lastTimestamp [12]byte
	lastConsumed  int64
	cookie        [16]byte
	cookieAt      int64 // mono; 0: none
	lastMAC1      [16]byte
	staged        []tunnel.Frame
	removed       bool

	kickPending  atomic.Bool
	offerPending atomic.Bool  // the pending kick is an offer
	lastSent     atomic.Int64 // mono: any message sent
	lastRecv     atomic.Int64 // mono: any authenticated message received
	// unanswered is when the first data message arrived since this node
	// last sent anything (0: none): a passive keepalive answers it after
	// KeepaliveTimeout. Later data does not push it back.
	unanswered    atomic.Int64
	waitingSince  atomic.Int64 // mono: first data sent since the last message received (0: none)
	lastHandshake atomic.Int64 // mono: last session established (0: never)
}

// staticDH is the static-static Diffie-Hellman of this node's key and the
// peer's, computed once per key.
type staticDH struct {
	km *keyMaterial
	ss [32]byte
	ok bool // the peer's key is a valid point
}

func newPeer(t *Transport, c PeerConfig, km *keyMaterial) *peer {
	p := &peer{t: t, name: c.Name, pub: c.Key, cfgEndpoint: c.Endpoint, allowed: slices.Clone(c.Subnets),
		mac1Key: blake2s.Sum256(append([]byte(labelMAC1), c.Key[:]...))}
	ep := c.Endpoint
	p.endpoint.Store(&ep)
	p.setStatic(km)
	return p
}

func (p *peer) setStatic(km *keyMaterial) {
	ss, err := dh(km.priv, p.pub)
	p.static.Store(&staticDH{km: km, ss: ss, ok: err == nil})
}

// takeOver moves the sessions of old (the same node under a new key,
// endpoint, name or subnets) to p, which is not published yet, with the
// frames staged for a session. With the same key the handshake in flight
// and the timers' state move too; a handshake made for another key is
// dropped.
func (p *peer) takeOver(old *peer) {
	old.mu.Lock()
	defer old.mu.Unlock()
	// p is reachable by the handshake's index from the swap below on.
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, kp := range []*keypair{old.prev, old.cur.Load(), old.next} {
		if kp != nil {
			kp.peer.Store(p)
		}
	}
	p.prev, p.next = old.prev, old.next
	p.cur.Store(old.cur.Load())
	p.lastHandshake.Store(old.lastHandshake.Load())
	p.lastTimestamp, p.lastConsumed = old.lastTimestamp, old.lastConsumed
	old.prev, old.next = nil, nil
	old.cur.Store(nil)
	old.removed = true
	p.staged, old.staged = old.staged, nil
	if old.pub == p.pub {
		if old.hs.state != hsNone && p.t.index.CompareAndSwap(old.hs.localIndex, old, p) {
			p.hs, p.attempt, p.retryAt, p.offered = old.hs, old.attempt, old.retryAt, old.offered
		}
		if old.offerHS.state != hsNone && p.t.index.CompareAndSwap(old.offerHS.localIndex, old, p) {
			p.offerHS, p.offerUntil = old.offerHS, old.offerUntil
		}
		p.lastInit, p.cookie, p.cookieAt, p.lastMAC1 = old.lastInit, old.cookie, old.cookieAt, old.lastMAC1
		p.endpoint.Store(old.endpoint.Load())
		for _, v := range []struct{ to, from *atomic.Int64 }{{&p.lastSent, &old.lastSent}, {&p.lastRecv, &old.lastRecv},
			{&p.unanswered, &old.unanswered}, {&p.waitingSince, &old.waitingSince}} {
			v.to.Store(v.from.Load())
		}
	} else {
		old.forgetHandshakesLocked()
	}
	old.hs, old.offerHS = handshake{}, handshake{}
}

// allows reports whether a lies in the peer's subnets (the zero Addr, of
// a packet tunnel.Addrs could not read, in none).
func (p *peer) allows(a netip.Addr) bool {
	for _, n := range p.allowed {
		if n.Contains(a) {
			return true
		}
	}
	return false
}

// sent records that a message left for the peer.
func (p *peer) sent(now int64) {
	p.lastSent.Store(now)
	if p.unanswered.Load() != 0 {
		p.unanswered.Store(0)
	}
}

// remove wipes a departed peer's sessions and handshake.
func (p *peer) remove() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.removed = true
	p.wipeLocked()
	p.dropStagedLocked(p.staged)
	p.staged = nil
}

// wipeLocked forgets every session and the handshake in flight.
func (p *peer) wipeLocked() {
	for _, kp := range []*keypair{p.prev, p.cur.Load(), p.next} {
		if kp != nil {
			p.t.index.CompareAndDelete(kp.local, kp)
		}
	}
	p.prev, p.next = nil, nil
	p.cur.Store(nil)
	p.forgetHandshakesLocked()
	p.attempt = 0
}

// forgetHandshakesLocked drops our initiations in flight (hs and a
// replaced offer) and their indices.
func (p *peer) forgetHandshakesLocked() {
	for _, hs := range []*handshake{&p.hs, &p.offerHS} {
		if hs.state != hsNone {
			p.t.index.CompareAndDelete(hs.localIndex, p)
			*hs = handshake{}
		}
	}
}

// kick asks the handshake goroutine for an initiation because data waits
// for a session (see initiate for how often), without blocking the
// caller.
func (p *peer) kick() {
	p.offerPending.Store(false)
	p.request()
}

// offer asks for an initiation nobody waits for yet: a new peer.
func (p *peer) offer() {
	p.offerPending.Store(true)
	p.request()
}

func (p *peer) request() {
	if p.kickPending.Swap(true) {
		return
	}
	select {
	case p.t.kicks <- p:
	default:
		p.kickPending.Store(false)
	}
}

// stage keeps a copy of a frame until a session exists; the oldest goes
// when the peer's queue is full. All peers' staged frames together hold
// at most maxStagedBytes: traffic to many peers that never answer cannot
// pin unbounded memory.
func (p *peer) stage(f *tunnel.Frame) {
	pkt := f.Packet()
	size := int64(tunnel.Headroom + len(pkt))
	if p.t.stagedBytes.Add(size) > maxStagedBytes {
		p.t.stagedBytes.Add(-size)
		p.t.ctr.Add(DropStaged, 1)
		return
	}
	buf := make([]byte, size)
	copy(buf[tunnel.Headroom:], pkt)
	c := tunnel.Frame{Buf: buf, Off: tunnel.Headroom, Offload: f.Offload, Addr: p.cfgEndpoint}
	p.mu.Lock()
	if p.removed {
		p.mu.Unlock()
		p.t.stagedBytes.Add(-size)
		return
	}
	if len(p.staged) >= maxStaged {
		p.dropStagedLocked(p.staged[:1])
		p.staged = p.staged[1:]
	}
	p.staged = append(p.staged, c)
	// A session installed (and the staged frames flushed) after the
	// caller found none: flush again, or this frame would wait for the
	// next handshake. Sessions are installed under p.mu, so either this
	// sees it or the installer sees this frame.
	ready := p.cur.Load().canSend(mono(), &p.t.timers)
	p.mu.Unlock()
	p.t.ctr.Add(Staged, 1)
	if ready {
		p.flushStaged()
	}
}

// dropStagedLocked gives up staged frames (counted) and their memory.
func (p *peer) dropStagedLocked(fs []tunnel.Frame) {
	var n int64
	for _, f := range fs {
		n += int64(len(f.Buf))
	}
	p.t.stagedBytes.Add(-n)
	p.t.ctr.Add(DropStaged, uint64(len(fs)))
}

// flushStaged sends what waited for a session.
func (p *peer) flushStaged() {
	p.mu.Lock()
	fs := p.staged
	p.staged = nil
	p.mu.Unlock()
	if len(fs) == 0 {
		return
	}
	var n int64
	for i := range fs {
		n += int64(len(fs[i].Buf))
		fs[i].Addr = p.cfgEndpoint // staged for a peer this one took over
	}
	p.t.stagedBytes.Add(-n)
	p.t.Send(fs)
}

// installLocked makes kp a session of p: an initiator's is used at once,
// a responder's once confirmed. When our own initiation completes while
// a responder session waits for confirmation (the two handshakes
// crossed), all three stay receivable: the current one (the peer sends
// on it until our response reaches it), the new one, and the waiting one
// (the peer's next); wireguard-go drops the current one there, and with
// it whatever the peer still had in flight.
func (p *peer) installLocked(kp *keypair) {
	idx := &p.t.index
	if kp.initiator {
		if p.prev != nil {
			idx.CompareAndDelete(p.prev.local, p.prev)
		}
		p.prev = p.cur.Load()
		p.cur.Store(kp)
		p.attempt = 0
	} else {
		// Not a handshake of ours: its retry budget runs on until a
		// session is confirmed (see confirm).
		if p.next != nil {
			idx.CompareAndDelete(p.next.local, p.next)
		}
		p.next = kp
	}
	p.lastHandshake.Store(kp.created)
}

// rotateLocked makes kp the current session, the current the previous.
func (p *peer) rotateLocked(kp *keypair) {
	if p.prev != nil {
		p.t.index.CompareAndDelete(p.prev.local, p.prev)
	}
	p.prev = p.cur.Load()
	p.cur.Store(kp)
}

// confirm promotes the responder session kp once its initiator used it.
func (p *peer) confirm(kp *keypair) {
	p.mu.Lock()
	promoted := p.next == kp
	if promoted {
		p.next = nil
		if cur := p.cur.Load(); cur != nil && cur.initiator && cur.created > kp.created {
			// Crossed handshakes: our own, newer session stays
			// current (its rekey timers run on it); the peer's stays
			// receivable.
			if p.prev != nil {
				p.t.index.CompareAndDelete(p.prev.local, p.prev)
			}
			p.prev = kp
		} else {
			p.rotateLocked(kp)
		}
		// A confirmed session completes the attempt (wireguard-go's
		// timersHandshakeComplete): our own initiation in flight, if
		// any, may still be answered until its retry is due, and is
		// then forgotten rather than retried (see runTimers).
		p.attempt = 0
	}
	p.mu.Unlock()
	if promoted {
		p.flushStaged()
	}
}

func randUint32() uint32 {
	var b [4]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint32(b[:])
}
