package wireguard

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/crypto/blake2s"

	"github.com/tulle-net/tulle/tunnel"
)

// peer is one remote node: its key, where it is, its sessions and the
// timestamps the timers read.
type peer struct {
	t           *Transport
	name        string
	pub         Key
	cfgEndpoint netip.AddrPort
	endpoint    atomic.Pointer[netip.AddrPort]
	mac1Key     [32]byte
	static      atomic.Pointer[staticDH]

	// cur is the session data is sent with (lock-free on the hot path).
	cur atomic.Pointer[keypair]

	mu sync.Mutex // everything below
	// prev is the session before cur (still received on); next is a
	// session we responded to, used once the initiator's first message
	// on it confirms it.
	prev, next *keypair
	hs         handshake // our initiation in flight
	attempt    int64     // mono: when the current handshake attempt began (0: none)
	lastInit   int64     // mono: when our last initiation left
	retryAt    int64     // mono: when it is retransmitted
	// Responder state: the greatest initiation timestamp consumed and
	// when (replay and flood protection).
	lastTimestamp [12]byte
	lastConsumed  int64
	cookie        [16]byte
	cookieAt      int64 // mono; 0: none
	lastMAC1      [16]byte
	staged        []tunnel.Frame
	removed       bool
	offered       bool // the initiation in flight is an offer (see initiate)

	kickPending   atomic.Bool
	offerPending  atomic.Bool  // the pending kick is an offer
	lastSent      atomic.Int64 // mono: any message sent
	lastRecv      atomic.Int64 // mono: any authenticated message received
	lastDataRecv  atomic.Int64 // mono: a data message received
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
	p := &peer{t: t, name: c.Name, pub: c.Key, cfgEndpoint: c.Endpoint,
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

// takeOver moves the sessions of old (the same key at another configured
// endpoint) to p.
func (p *peer) takeOver(old *peer) {
	old.mu.Lock()
	defer old.mu.Unlock()
	for _, kp := range []*keypair{old.prev, old.cur.Load(), old.next} {
		if kp != nil {
			kp.peer = p
		}
	}
	p.prev, p.next = old.prev, old.next
	p.cur.Store(old.cur.Load())
	p.lastHandshake.Store(old.lastHandshake.Load())
	p.lastTimestamp, p.lastConsumed = old.lastTimestamp, old.lastConsumed
	old.prev, old.next = nil, nil
	old.cur.Store(nil)
	old.removed = true
	if old.hs.state != hsNone {
		p.t.index.Delete(old.hs.localIndex)
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
	if p.hs.state != hsNone {
		p.t.index.CompareAndDelete(p.hs.localIndex, p)
		p.hs = handshake{}
	}
	p.attempt = 0
}

// kick asks the handshake goroutine for an initiation because data waits
// for a session (rate-limited there), without blocking the caller.
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
	p.mu.Unlock()
	p.t.ctr.Add(Staged, 1)
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
	for _, f := range fs {
		n += int64(len(f.Buf))
	}
	p.t.stagedBytes.Add(-n)
	p.t.Send(fs)
}

// installLocked makes kp a session of p: an initiator's is used at once,
// a responder's once confirmed. A responder session still waiting for
// confirmation when our own initiation completes (the two crossed) stays
// receivable as the previous one: the peer may be sending on it.
func (p *peer) installLocked(kp *keypair) {
	idx := &p.t.index
	if kp.initiator {
		if p.prev != nil {
			idx.CompareAndDelete(p.prev.local, p.prev)
		}
		if p.next != nil {
			if cur := p.cur.Load(); cur != nil {
				idx.CompareAndDelete(cur.local, cur)
			}
			p.prev, p.next = p.next, nil
		} else {
			p.prev = p.cur.Load()
		}
		p.cur.Store(kp)
	} else {
		if p.next != nil {
			idx.CompareAndDelete(p.next.local, p.next)
		}
		p.next = kp
	}
	p.lastHandshake.Store(kp.created)
	p.attempt = 0
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
		p.rotateLocked(kp)
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
