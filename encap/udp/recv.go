package udp

import (
	"net/netip"
	"time"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

const (
	recvBatch = 8

	// TrainSlots is how many trains one peer may have in reassembly at
	// once: enough for a few interleaved trains, small enough that a
	// flood forging one peer's address holds at most this many buffers.
	TrainSlots = 4
	// MaxTrainBuffers caps the reassembly buffers of one socket, whatever
	// the number of peers: TrainSlots × 64 KiB per peer, and this many in
	// all (4.2 MB per underlay family).
	MaxTrainBuffers = 64
	// trainTimeout abandons a train that stopped arriving; trains cross
	// in well under a millisecond, so anything this old lost a datagram.
	trainTimeout = 2 * time.Second
	// sweepInterval is how often abandoned trains and the state of
	// departed peers are freed.
	sweepInterval = time.Second
	trainBufSize  = tunnel.Headroom + DescLen + tunnel.MaxPacket
)

// receiver turns datagrams into frames for one socket. It keeps a cursor
// into the last recvmmsg batch, so a GRO message holding more frames than
// the caller has room for is handed out over several calls.
type receiver struct {
	t *Transport
	c *udpsock.Cursor

	clock     func() time.Time
	now       time.Time // taken once per recvmmsg batch
	nextSweep time.Time
	trains    reassembly
	co        tunnel.Coalescer
}

// reassembly holds the trains being rebuilt datagram by datagram, per peer
// endpoint. Entries exist only for sources Accept admitted, each with at
// most TrainSlots trains, all drawing on at most MaxTrainBuffers buffers.
type reassembly struct {
	peers map[netip.AddrPort]*peerTrains
	free  [][]byte // buffers not in use
	alloc int      // buffers allocated, in use or free
	// active lists the trains holding a buffer, least recently started
	// first: the eviction order when the buffers run out.
	active trainList
}

// trainList is an intrusive doubly linked list of trains.
type trainList struct{ head, tail *train }

func (l *trainList) push(t *train) {
	t.prev, t.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = t
	} else {
		l.head = t
	}
	l.tail = t
}

func (l *trainList) remove(t *train) {
	if t.prev != nil {
		t.prev.next = t.next
	} else if l.head == t {
		l.head = t.next
	}
	if t.next != nil {
		t.next.prev = t.prev
	} else if l.tail == t {
		l.tail = t.prev
	}
	t.prev, t.next = nil, nil
}

// peerTrains are one peer's trains in flight.
type peerTrains struct {
	slots [TrainSlots]train
	// dropped remembers the last abandoned frame ids, so the rest of an
	// abandoned train is not counted again.
	dropped [TrainSlots]uint16
	ndrop   int
	last    time.Time
}

// train is one frame being rebuilt in order.
type train struct {
	active bool
	id     uint16
	count  uint8
	want   uint8 // index of the next datagram
	buf    []byte
	n      int
	last   time.Time
	owner  *peerTrains
	// prev and next link the trains holding buffers (reassembly.active).
	prev, next *train
}

// newReceiver reads one socket; sparse: the sparse flows' (ListenSteered).
func newReceiver(t *Transport, read udpsock.ReadFunc, gro, sparse bool) *receiver {
	r := &receiver{t: t, clock: time.Now, trains: reassembly{peers: map[netip.AddrPort]*peerTrains{}}}
	r.c = udpsock.NewCursor(read, recvBatch, tunnel.Headroom, 65536, func(src netip.AddrPort, dgs int) bool {
		t.ctr.Add(DatagramsIn, uint64(dgs))
		if sparse {
			t.ctr.Add(SparseIn, uint64(dgs))
		}
		if !t.opt.Accept(src) {
			t.ctr.Add(DropUnknownSource, uint64(dgs))
			return false
		}
		return true
	})
	return r
}

func (r *receiver) receive(frames []tunnel.Frame) (int, error) {
	out := 0
	for out < len(frames) {
		if r.c.Done() {
			if out > 0 {
				return out, nil
			}
			if err := r.fill(); err != nil {
				return 0, err
			}
			continue
		}
		base, dg := r.c.Take()
		emitted, stop := r.datagram(&frames[out], r.c.Buf(), base, dg)
		r.c.Settle()
		if emitted {
			out++
		}
		if stop {
			break
		}
	}
	return out, nil
}

// fill reads a new batch of messages, and frees what abandoned trains and
// departed peers hold once a sweep interval has passed.
func (r *receiver) fill() error {
	if err := r.c.Fill(); err != nil {
		return err
	}
	r.now = r.clock()
	if r.now.After(r.nextSweep) {
		r.sweep()
		r.nextSweep = r.now.Add(sweepInterval)
	}
	return nil
}

// datagram handles one datagram dg, found at buf[base:]. It reports
// whether f was filled, and whether the call must return now (f points
// into a reassembly buffer that the next datagram could overwrite).
func (r *receiver) datagram(f *tunnel.Frame, buf []byte, base int, dg []byte) (emitted, stop bool) {
	ctr := r.t.ctr
	h, err := ParseHeader(dg)
	if err != nil {
		if err == ErrVersion {
			ctr.Add(DropBadVersion, 1)
		} else {
			ctr.Add(DropBadHeader, 1)
		}
		return false, false
	}
	payload := dg[h.Len:]
	f.Addr = r.c.Src
	if h.Type == TypePacket {
		f.Buf, f.Off, f.Offload = buf[:base+len(dg)], base+h.Len, tunnel.Offload{}
		return true, false
	}
	if h.Index == 0 && h.Count == 1 {
		if !r.frame(f, buf[:base+len(dg)], base+h.Len) {
			return false, false
		}
		r.coalesce(f, buf)
		return true, false
	}
	if h.Index == 0 {
		if n, ok := r.inPlace(buf, base, h, dg); ok {
			return r.frame(f, buf[:base+h.Len+n], base+h.Len), false
		}
	}
	return r.slow(f, h, payload)
}

// frame fills f from a frame (descriptor + packet) at buf[start:].
func (r *receiver) frame(f *tunnel.Frame, buf []byte, start int) bool {
	o, err := parseDesc(buf[start:])
	if err != nil || len(buf)-start-DescLen < 20 {
		r.t.ctr.Add(DropBadHeader, 1)
		return false
	}
	f.Buf, f.Off, f.Offload = buf, start+DescLen, o
	return true
}

// coalesce merges into f the single-datagram frames that follow it in
// the current batch from the same peer and continue its TCP flow (the
// pieces a sender cut a super-packet into, or plain segments), so that
// what arrived of a super-packet reaches the TUN in one write. What does
// not continue the run is handled on its own.
func (r *receiver) coalesce(f *tunnel.Frame, buf []byte) {
	co := &r.co
	if !co.Start(buf, f.Off, len(f.Buf), f.Offload) {
		return
	}
	src := r.c.Src
	for {
		dg := r.c.Peek()
		if dg == nil {
			// On into the next message of the batch if it comes from the
			// same peer: without GRO on the underlay every datagram is a
			// message of its own.
			r.c.Settle()
			if r.c.Done() || r.c.Src != src {
				break
			}
			continue
		}
		h, err := ParseHeader(dg)
		if err != nil || h.Type != TypeFrame || h.Count != 1 || len(dg) < h.Len+DescLen {
			break
		}
		o, _ := parseDesc(dg[h.Len:])
		if !co.Add(dg[h.Len+DescLen:], o) {
			break
		}
		r.c.Off += len(dg)
	}
	end, o, n := co.Finish()
	if n > 1 {
		f.Buf, f.Offload = buf[:end], o
		r.t.ctr.Add(Coalesced, uint64(n))
	}
}

// inPlace rebuilds a train whose datagrams all sit in the current message
// by sliding the slices together over their headers. It returns the frame
// length and consumes the datagrams.
func (r *receiver) inPlace(buf []byte, base int, h Header, dg []byte) (int, bool) {
	msgEnd := tunnel.Headroom + len(r.c.Data())
	seg := r.c.Seg
	// Every datagram but the last is seg bytes; they must all be here.
	if base+int(h.Count-1)*seg >= msgEnd {
		return 0, false
	}
	for k := 1; k < int(h.Count); k++ {
		p := base + k*seg
		hk, err := ParseHeader(buf[p:min(p+seg, msgEnd)])
		if err != nil || hk.Type != TypeFrame || hk.FrameID != h.FrameID || int(hk.Index) != k || hk.Count != h.Count || hk.Len != h.Len {
			return 0, false
		}
	}
	dst := base + h.Len
	w := len(dg) - h.Len
	for k := 1; k < int(h.Count); k++ {
		p := base + k*seg
		e := min(p+seg, msgEnd)
		w += copy(buf[dst+w:], buf[p+h.Len:e])
	}
	r.c.Off = min(base+int(h.Count)*seg, msgEnd) - tunnel.Headroom
	return w, true
}

// slow rebuilds a train datagram by datagram in a buffer of the peer's.
// Each train is taken in order: a gap or a reordering inside it drops that
// frame (TCP recovers); up to TrainSlots trains of one peer may interleave.
func (r *receiver) slow(f *tunnel.Frame, h Header, payload []byte) (emitted, stop bool) {
	ctr := r.t.ctr
	rs := &r.trains
	p := rs.peers[r.c.Src]
	if p == nil {
		p = &peerTrains{}
		rs.peers[r.c.Src] = p
	}
	p.last = r.now
	if h.Index == 0 {
		tr := p.slotFor(h.FrameID)
		if tr.active {
			r.abandon(p, tr, DropIncomplete) // a repeated start, or the peer's oldest
		}
		if tr.buf == nil && !r.takeBuffer(tr) {
			return false, false
		}
		tr.active, tr.id, tr.count, tr.want, tr.last, tr.owner = true, h.FrameID, h.Count, 1, r.now, p
		tr.n = tunnel.Headroom + copy(tr.buf[tunnel.Headroom:], payload)
		return false, false
	}
	tr := p.find(h.FrameID)
	if tr == nil {
		if h.Index == h.Count-1 && !p.wasDropped(h.FrameID) {
			// The tail of a train whose start was lost.
			p.remember(h.FrameID)
			ctr.Add(DropIncomplete, 1)
		}
		return false, false
	}
	if h.Index != tr.want || h.Count != tr.count {
		r.abandon(p, tr, DropIncomplete)
		return false, false
	}
	if tr.n+len(payload) > len(tr.buf) {
		r.abandon(p, tr, DropBadHeader)
		return false, false
	}
	tr.n += copy(tr.buf[tr.n:], payload)
	tr.want++
	tr.last = r.now
	if tr.want < tr.count {
		return false, false
	}
	// Complete: the frame points into the buffer, which goes back to the
	// pool but is not written before the caller's next receive.
	buf, n := tr.buf, tr.n
	tr.active = false
	r.release(tr)
	return r.frame(f, buf[:n], tunnel.Headroom), true
}

// slotFor returns the slot a new train id goes in: its own if the start is
// repeated, else a free one, else the peer's least recently active one.
func (p *peerTrains) slotFor(id uint16) *train {
	if tr := p.find(id); tr != nil {
		return tr
	}
	var oldest *train
	for i := range p.slots {
		tr := &p.slots[i]
		if !tr.active {
			return tr
		}
		if oldest == nil || tr.last.Before(oldest.last) {
			oldest = tr
		}
	}
	return oldest
}

func (p *peerTrains) find(id uint16) *train {
	for i := range p.slots {
		if p.slots[i].active && p.slots[i].id == id {
			return &p.slots[i]
		}
	}
	return nil
}

func (p *peerTrains) remember(id uint16) {
	p.dropped[p.ndrop%len(p.dropped)] = id
	p.ndrop++
}

func (p *peerTrains) wasDropped(id uint16) bool {
	for i := range min(p.ndrop, len(p.dropped)) {
		if p.dropped[i] == id {
			return true
		}
	}
	return false
}

// abandon drops an active train, counts it under why and frees its buffer.
func (r *receiver) abandon(p *peerTrains, tr *train, why Counter) {
	tr.active = false
	p.remember(tr.id)
	r.t.ctr.Add(why, 1)
	r.release(tr)
}

// takeBuffer gives tr a reassembly buffer: a free one, a new one while
// under MaxTrainBuffers, else the buffer of the least recently active train
// of any peer, which is abandoned (counted as drop_train_evicted).
func (r *receiver) takeBuffer(tr *train) bool {
	rs := &r.trains
	switch {
	case len(rs.free) > 0:
		tr.buf = rs.free[len(rs.free)-1]
		rs.free = rs.free[:len(rs.free)-1]
	case rs.alloc < MaxTrainBuffers:
		rs.alloc++
		tr.buf = make([]byte, trainBufSize)
	default:
		victim := rs.active.head
		if victim == nil || victim == tr {
			r.t.ctr.Add(DropTrainEvicted, 1)
			return false
		}
		r.abandon(victim.owner, victim, DropTrainEvicted)
		return r.takeBuffer(tr)
	}
	rs.active.push(tr)
	return true
}

// release returns tr's buffer to the pool.
func (r *receiver) release(tr *train) {
	if tr.buf != nil {
		r.trains.active.remove(tr)
		r.trains.free = append(r.trains.free, tr.buf)
		tr.buf = nil
	}
}

// sweep abandons trains that stopped arriving and forgets peers that went
// quiet or are no longer accepted (a peer that left the cluster).
func (r *receiver) sweep() {
	for src, p := range r.trains.peers {
		gone := !r.t.opt.Accept(src)
		busy := false
		for i := range p.slots {
			tr := &p.slots[i]
			if tr.active && (gone || r.now.Sub(tr.last) > trainTimeout) {
				r.abandon(p, tr, DropIncomplete)
			}
			busy = busy || tr.active
		}
		if gone || (!busy && r.now.Sub(p.last) > trainTimeout) {
			delete(r.trains.peers, src)
		}
	}
}
