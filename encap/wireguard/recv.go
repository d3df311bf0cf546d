package wireguard

import (
	"encoding/binary"
	"net/netip"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// recvBatch is how many messages one recvmmsg reads.
const recvBatch = 8

// receiver opens what one socket receives. A UDP GRO message is opened
// whole, in place (each datagram's plaintext stays where its ciphertext
// was), then handed out as frames: consecutive TCP segments of one flow
// merged into one super-packet.
type receiver struct {
	t     *Transport
	s     *udpsock.Socket
	c     *udpsock.Cursor
	nonce []byte
	co    tunnel.Coalescer
	// pend are the current message's decrypted packets, buf its buffer;
	// pi is the next to hand out.
	pend []pending
	pi   int
	buf  []byte
	// last caches the index lookup: a message's datagrams share a session.
	lastIdx uint32
	lastKP  *keypair
}

type pending struct {
	off, n int
	p      *peer
}

func newReceiver(t *Transport, s *udpsock.Socket) *receiver {
	r := &receiver{t: t, s: s, nonce: make([]byte, 12), co: tunnel.Coalescer{Trusted: true}}
	r.c = udpsock.NewCursor(s.BC.ReadBatch, recvBatch, tunnel.Headroom, 65536, func(_ netip.AddrPort, dgs int) bool {
		t.ctr.Add(DatagramsIn, uint64(dgs))
		return true // a peer may roam: sources are authenticated by their keys
	})
	return r
}

func (r *receiver) receive(frames []tunnel.Frame) (int, error) {
	out := 0
	for out < len(frames) {
		switch {
		case r.pi < len(r.pend):
			r.emit(&frames[out])
			out++
		case !r.c.Done():
			r.open()
		case out > 0:
			return out, nil
		default:
			if err := r.c.Fill(); err != nil {
				return 0, err
			}
			r.lastKP = nil
		}
	}
	return out, nil
}

// open decrypts every datagram of the current message.
func (r *receiver) open() {
	r.pend, r.pi = r.pend[:0], 0
	r.buf = r.c.Buf()
	src := r.c.Src
	now := mono()
	for {
		base, dg := r.c.Take()
		if dg == nil {
			break
		}
		r.datagram(base, dg, src, now)
	}
	r.c.Settle()
}

// datagram handles one datagram at r.buf[base:].
func (r *receiver) datagram(base int, dg []byte, src netip.AddrPort, now int64) {
	t := r.t
	ctr := t.ctr
	if len(dg) < 4 || dg[1]|dg[2]|dg[3] != 0 {
		ctr.Add(DropMalformed, 1)
		return
	}
	switch dg[0] {
	case typeTransport:
	case typeInitiation, typeResponse, typeCookie:
		r.handshake(dg, src)
		return
	default:
		ctr.Add(DropMalformed, 1)
		return
	}
	if len(dg) < keepaliveSize {
		ctr.Add(DropMalformed, 1)
		return
	}
	idx := binary.LittleEndian.Uint32(dg[4:])
	kp := r.lastKP
	if kp == nil || r.lastIdx != idx {
		v, _ := t.index.Load(idx)
		if kp, _ = v.(*keypair); kp == nil {
			// Dropped, as wireguard-go does, and no handshake offered:
			// the source is not authenticated, so an off-path attacker
			// could spoof a peer's address and force handshakes. A peer
			// still sending on a session this node lost (it restarted)
			// is offered one anyway: tulled offers every peer a
			// handshake when it starts.
			ctr.Add(DropUnknownIndex, 1)
			return
		}
		r.lastIdx, r.lastKP = idx, kp
	}
	if !kp.usable(now, &t.timers) {
		ctr.Add(DropExpired, 1)
		return
	}
	counter := binary.LittleEndian.Uint64(dg[8:])
	binary.LittleEndian.PutUint64(r.nonce[4:], counter)
	pt, err := kp.recv.Open(dg[HeaderLen:HeaderLen], r.nonce, dg[HeaderLen:], nil)
	if err != nil {
		ctr.Add(DropAuth, 1)
		return
	}
	kp.mu.Lock()
	fresh := kp.replay.accept(counter)
	kp.mu.Unlock()
	if !fresh {
		ctr.Add(DropReplay, 1)
		return
	}
	p := kp.peer.Load()
	p.lastRecv.Store(now)
	p.waitingSince.Store(0)
	if *p.endpoint.Load() != src {
		roamed := src // only here does the address move to the heap
		p.endpoint.Store(&roamed)
	}
	if !kp.confirmed.Load() {
		kp.confirmed.Store(true)
		p.confirm(kp)
	}
	if kp.initiator && now-kp.created >= int64(t.timers.RejectAfterTime-t.timers.KeepaliveTimeout-t.timers.RekeyTimeout) && p.cur.Load() == kp {
		p.kick()
	}
	if len(pt) == 0 {
		ctr.Add(KeepalivesReceived, 1)
		return
	}
	if p.unanswered.Load() == 0 {
		p.unanswered.CompareAndSwap(0, now)
	}
	n := ipLen(pt)
	if n == 0 {
		ctr.Add(DropNotIP, 1)
		return
	}
	if from, _, _ := tunnel.Addrs(pt[:n]); !p.allows(from) {
		// Its key may speak only for its subnets (WireGuard's
		// cryptokey routing).
		ctr.Add(DropAllowedIPs, 1)
		return
	}
	r.pend = append(r.pend, pending{off: base + HeaderLen, n: n, p: p})
}

// ipLen returns the length of the IP packet at the start of b (the rest
// is padding), or 0 if b holds none.
func ipLen(b []byte) int {
	if len(b) < 20 {
		return 0
	}
	var n int
	switch b[0] >> 4 {
	case 4:
		n = int(binary.BigEndian.Uint16(b[2:]))
		if n < 20 {
			return 0
		}
	case 6:
		if len(b) < 40 {
			return 0
		}
		n = 40 + int(binary.BigEndian.Uint16(b[4:]))
	default:
		return 0
	}
	if n > len(b) {
		return 0
	}
	return n
}

// emit hands out the next decrypted packet, merged with the TCP segments
// of its flow that follow it.
func (r *receiver) emit(f *tunnel.Frame) {
	e := r.pend[r.pi]
	r.pi++
	f.Buf, f.Off, f.Offload, f.Addr = r.buf[:e.off+e.n], e.off, tunnel.Offload{}, e.p.cfgEndpoint
	co := &r.co
	if !co.Start(r.buf, e.off, e.off+e.n, tunnel.Offload{}) {
		return
	}
	for r.pi < len(r.pend) && r.pend[r.pi].p == e.p {
		q := r.pend[r.pi]
		if !co.Add(r.buf[q.off:q.off+q.n], tunnel.Offload{}) {
			break
		}
		r.pi++
	}
	end, o, merged := co.Finish()
	if merged > 1 {
		f.Buf, f.Offload = r.buf[:end], o
		r.t.ctr.Add(Coalesced, uint64(merged))
	}
}

// handshake checks a handshake message's size and mac1 and queues it for
// the handshake goroutine.
func (r *receiver) handshake(dg []byte, src netip.AddrPort) {
	ctr := r.t.ctr
	if len(dg) != messageSize(dg[0]) {
		ctr.Add(DropMalformed, 1)
		return
	}
	km := r.t.keys.Load()
	if dg[0] != typeCookie && !validMAC1(dg, km) {
		// A peer that has not learned this node's new key yet.
		if km = r.t.previousKeys(); km == nil || !validMAC1(dg, km) {
			ctr.Add(DropMAC1, 1)
			return
		}
	}
	m := hsMessage{n: len(dg), src: src, sock: r.s, km: km}
	copy(m.buf[:], dg)
	select {
	case r.t.hsq <- m:
	default:
		ctr.Add(DropHandshakeQueue, 1)
	}
}
