package udp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tunnel"
)

const (
	recvBatch   = 8
	recvBufSize = tunnel.Headroom + 65536
	partialIdle = 10 * time.Second
)

type readFunc func(ms []ipv4.Message, flags int) (int, error)

// receiver turns datagrams into frames for one socket. It keeps a cursor
// into the last recvmmsg batch, so a GRO message holding more frames than
// the caller has room for is handed out over several calls.
type receiver struct {
	t    *Transport
	read readFunc
	msgs []ipv4.Message
	iovs [][1][]byte
	bufs [][]byte
	oobs [][]byte

	n, mi int            // messages in the batch, current message
	off   int            // offset of the next datagram in the current message
	seg   int            // datagram size of the current message (GRO segment size)
	src   netip.AddrPort // sender of the current message

	partial map[netip.AddrPort]*partial
	calls   int
}

// partial is a train being rebuilt across messages.
type partial struct {
	active bool
	id     uint16
	count  uint8
	next   uint8
	hlen   int
	buf    []byte
	n      int
	last   time.Time
	// dropped is the id of the last train counted as incomplete, so its
	// stray tail is not counted again.
	dropped      uint16
	droppedValid bool
}

func newReceiver(t *Transport, read readFunc, gro bool) *receiver {
	r := &receiver{t: t, read: read, partial: map[netip.AddrPort]*partial{}}
	r.msgs = make([]ipv4.Message, recvBatch)
	r.iovs = make([][1][]byte, recvBatch)
	r.bufs = make([][]byte, recvBatch)
	r.oobs = make([][]byte, recvBatch)
	for i := range r.msgs {
		r.bufs[i] = make([]byte, recvBufSize)
		r.oobs[i] = make([]byte, unix.CmsgSpace(4)*2)
	}
	return r
}

func (r *receiver) receive(frames []tunnel.Frame) (int, error) {
	out := 0
	r.calls++
	if r.calls%4096 == 0 {
		r.sweep()
	}
	for out < len(frames) {
		if r.mi >= r.n {
			if out > 0 {
				return out, nil
			}
			if err := r.fill(); err != nil {
				return 0, err
			}
			continue
		}
		m := &r.msgs[r.mi]
		data := r.bufs[r.mi][tunnel.Headroom : tunnel.Headroom+m.N]
		end := min(r.off+r.seg, len(data))
		base := tunnel.Headroom + r.off
		dg := data[r.off:end]
		r.off = end
		emitted, stop := r.datagram(&frames[out], r.bufs[r.mi], base, dg, data)
		if r.off >= len(data) {
			r.next()
		}
		if emitted {
			out++
		}
		if stop {
			break
		}
	}
	return out, nil
}

// fill reads a new batch of messages.
func (r *receiver) fill() error {
	for i := range r.msgs {
		r.iovs[i][0] = r.bufs[i][tunnel.Headroom:]
		r.msgs[i] = ipv4.Message{Buffers: r.iovs[i][:], OOB: r.oobs[i]}
	}
	n, err := r.read(r.msgs, 0)
	if err != nil {
		return err
	}
	r.n, r.mi = n, -1
	r.next()
	return nil
}

// next moves to the next message from an accepted source.
func (r *receiver) next() {
	ctr := r.t.ctr
	for r.mi++; r.mi < r.n; r.mi++ {
		m := &r.msgs[r.mi]
		r.off = 0
		r.seg = groSize(m.OOB[:m.NN])
		if r.seg <= 0 || r.seg > m.N {
			r.seg = m.N
		}
		dgs := uint64((m.N + r.seg - 1) / max(r.seg, 1))
		ua, ok := m.Addr.(*net.UDPAddr)
		if !ok || m.N == 0 {
			continue
		}
		ap := ua.AddrPort()
		r.src = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		ctr.Add(tunnel.DatagramsIn, dgs)
		if !r.t.opt.Accept(r.src.Addr()) {
			ctr.Add(tunnel.DropUnknownSource, dgs)
			continue
		}
		return
	}
}

// groSize returns the UDP_GRO segment size from a control message buffer,
// or 0.
func groSize(oob []byte) int {
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafePointer(oob))
		l := int(h.Len)
		if l < unix.CmsgLen(0) || l > len(oob) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(2) {
			d := oob[unix.CmsgLen(0):l]
			if len(d) >= 4 {
				return int(binary.NativeEndian.Uint32(d))
			}
			return int(binary.NativeEndian.Uint16(d))
		}
		oob = oob[min(cmsgAlign(l), len(oob)):]
	}
	return 0
}

func cmsgAlign(n int) int { return (n + 7) &^ 7 }

// datagram handles one datagram dg, found at buf[base:]; msg is the rest of
// its message (for the in-place train fast path). It reports whether f was
// filled, and whether the call must return now (f points into a reassembly
// buffer that the next datagram could overwrite).
func (r *receiver) datagram(f *tunnel.Frame, buf []byte, base int, dg, msg []byte) (emitted, stop bool) {
	ctr := r.t.ctr
	h, err := ParseHeader(dg)
	if err != nil {
		if err == ErrVersion {
			ctr.Add(tunnel.DropBadVersion, 1)
		} else {
			ctr.Add(tunnel.DropBadHeader, 1)
		}
		return false, false
	}
	payload := dg[h.Len:]
	f.Addr = r.src
	if h.Type == TypePacket {
		f.Buf, f.Off, f.Offload = buf[:base+len(dg)], base+h.Len, tunnel.Offload{}
		return true, false
	}
	if h.Index == 0 && h.Count == 1 {
		return r.frame(f, buf[:base+len(dg)], base+h.Len), false
	}
	if h.Index == 0 {
		if n, ok := r.inPlace(buf, base, h, dg); ok {
			r.dropPartial()
			return r.frame(f, buf[:base+h.Len+n], base+h.Len), false
		}
	}
	return r.slow(f, h, payload)
}

// frame fills f from a frame (descriptor + packet) at buf[start:].
func (r *receiver) frame(f *tunnel.Frame, buf []byte, start int) bool {
	o, err := parseDesc(buf[start:])
	if err != nil || len(buf)-start-DescLen < 20 {
		r.t.ctr.Add(tunnel.DropBadHeader, 1)
		return false
	}
	f.Buf, f.Off, f.Offload = buf, start+DescLen, o
	return true
}

// inPlace rebuilds a train whose datagrams all sit in the current message
// by sliding the slices together over their headers. It returns the frame
// length and consumes the datagrams.
func (r *receiver) inPlace(buf []byte, base int, h Header, dg []byte) (int, bool) {
	msgEnd := tunnel.Headroom + r.msgs[r.mi].N
	// Every datagram but the last is seg bytes; they must all be here.
	if base+int(h.Count-1)*r.seg >= msgEnd {
		return 0, false
	}
	for k := 1; k < int(h.Count); k++ {
		p := base + k*r.seg
		hk, err := ParseHeader(buf[p:min(p+r.seg, msgEnd)])
		if err != nil || hk.Type != TypeFrame || hk.FrameID != h.FrameID || int(hk.Index) != k || hk.Count != h.Count || hk.Len != h.Len {
			return 0, false
		}
	}
	dst := base + h.Len
	w := len(dg) - h.Len
	for k := 1; k < int(h.Count); k++ {
		p := base + k*r.seg
		e := min(p+r.seg, msgEnd)
		w += copy(buf[dst+w:], buf[p+h.Len:e])
	}
	r.off = min(base+int(h.Count)*r.seg, msgEnd) - tunnel.Headroom
	return w, true
}

func (r *receiver) dropPartial() {
	if p := r.partial[r.src]; p != nil && p.active {
		p.drop(r.t.ctr)
	}
}

func (p *partial) drop(ctr *tunnel.Counters) {
	p.active = false
	p.dropped, p.droppedValid = p.id, true
	ctr.Add(tunnel.DropIncomplete, 1)
}

// slow rebuilds a train datagram by datagram in a per-peer buffer. Trains
// are taken in order only: a gap, a reordering or an interleaved train
// drops the frame (TCP recovers; this keeps memory to one frame per peer).
func (r *receiver) slow(f *tunnel.Frame, h Header, payload []byte) (emitted, stop bool) {
	ctr := r.t.ctr
	p := r.partial[r.src]
	if p == nil {
		p = &partial{buf: make([]byte, tunnel.Headroom+DescLen+tunnel.MaxPacket)}
		r.partial[r.src] = p
	}
	p.last = time.Now()
	if h.Index == 0 {
		r.dropPartial()
		p.active, p.id, p.count, p.next, p.hlen = true, h.FrameID, h.Count, 1, h.Len
		p.n = tunnel.Headroom + copy(p.buf[tunnel.Headroom:], payload)
		return false, false
	}
	if !p.active || h.FrameID != p.id || h.Index != p.next || h.Count != p.count {
		if p.active {
			p.drop(ctr)
		} else if h.Index == h.Count-1 && (!p.droppedValid || p.dropped != h.FrameID) {
			// The tail of a train whose start was lost.
			p.dropped, p.droppedValid = h.FrameID, true
			ctr.Add(tunnel.DropIncomplete, 1)
		}
		return false, false
	}
	if p.n+len(payload) > len(p.buf) {
		p.active = false
		p.dropped, p.droppedValid = p.id, true
		ctr.Add(tunnel.DropBadHeader, 1)
		return false, false
	}
	p.n += copy(p.buf[p.n:], payload)
	p.next++
	if p.next < p.count {
		return false, false
	}
	p.active = false
	return r.frame(f, p.buf[:p.n], tunnel.Headroom), true
}

// sweep forgets reassembly state of peers that went quiet.
func (r *receiver) sweep() {
	now := time.Now()
	for k, p := range r.partial {
		if now.Sub(p.last) > partialIdle {
			delete(r.partial, k)
		}
	}
}
