package udp

import (
	"encoding/binary"
	"errors"
	"net"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tunnel"
)

const (
	// maxGSOSegments is the kernel's per-send limit (UDP_MAX_SEGMENTS was
	// 64 before Linux 5.?; 64 is safe everywhere).
	maxGSOSegments = 64
	// maxGSOBytes bounds one UDP_SEGMENT send (a UDP length is 16 bits).
	maxGSOBytes = 65000
	slabSize    = 1 << 20
)

// pending is a run of datagrams to one peer laid out in the slab, waiting
// for sendmmsg: a train, or single-datagram frames coalesced because they
// share a destination and a size. All datagrams but the last are seg bytes,
// which is the shape UDP GSO sends in one message.
type pending struct {
	s      *socket
	addr   *net.UDPAddr
	buf    []byte
	seg    int  // datagram size (all but the last)
	closed bool // a shorter last datagram or a train: nothing may follow
}

// sender lays frames out as datagrams and sends them. Send is called by the
// datapath's tx goroutine only.
type sender struct {
	t       *Transport
	slab    []byte
	used    int
	scratch []byte
	pend    []pending
	msgs    []ipv4.Message
	segs    []int // UDP_SEGMENT size of msgs[i], 0 for none
	iovs    [][1][]byte
	oobs    [][]byte
	addrs   udpAddrCache
	frameID uint16
}

func (s *sender) init(t *Transport) {
	s.t = t
	s.slab = make([]byte, slabSize)
	s.scratch = make([]byte, tunnel.BufSize+DescLen)
}

// Send implements tunnel.Transport.
func (t *Transport) Send(frames []tunnel.Frame) error {
	return t.sender.send(frames)
}

func (s *sender) send(frames []tunnel.Frame) error {
	ctr := s.t.ctr
	for i := range frames {
		f := &frames[i]
		sk := s.t.sockFor(f.Addr)
		if sk == nil {
			ctr.Add(DropSend, 1)
			continue
		}
		addr := s.addrs.get(f.Addr)
		pkt := f.Packet()
		maxDg := int(sk.maxDg.Load())
		switch {
		case f.Offload.None() && HeaderLen+len(pkt) <= maxDg && f.Off >= HeaderLen:
			b := f.Buf[f.Off-HeaderLen:]
			Header{Type: TypePacket, Count: 1}.Marshal(b)
			if err := s.single(sk, addr, b); err != nil {
				return err
			}
		case Overhead+len(pkt) <= maxDg && f.Off >= Overhead:
			b := f.Buf[f.Off-Overhead:]
			s.frameID++
			Header{Type: TypeFrame, FrameID: s.frameID, Count: 1}.Marshal(b)
			putDesc(b[HeaderLen:], f.Offload)
			if err := s.single(sk, addr, b); err != nil {
				return err
			}
		default:
			if err := s.train(sk, addr, f, maxDg); err != nil {
				return err
			}
		}
	}
	return s.flush()
}

// single queues one datagram. It joins the previous run when that run goes
// to the same peer with datagrams of the same size (this one may be
// shorter, and then ends the run), so a burst of small packets to one peer
// leaves in one UDP GSO send instead of one message each.
func (s *sender) single(sk *socket, addr *net.UDPAddr, dg []byte) error {
	if s.used+len(dg) > len(s.slab) {
		if err := s.flush(); err != nil {
			return err
		}
	}
	start := s.used
	s.used += copy(s.slab[start:], dg)
	if n := len(s.pend); n > 0 {
		p := &s.pend[n-1]
		if p.s == sk && p.addr == addr && !p.closed && len(dg) <= p.seg &&
			len(p.buf)/p.seg < maxGSOSegments && len(p.buf)+len(dg) <= maxGSOBytes && &p.buf[len(p.buf)-1] == &s.slab[start-1] {
			p.buf = p.buf[:len(p.buf)+len(dg)]
			p.closed = len(dg) < p.seg
			return nil
		}
	}
	s.pend = append(s.pend, pending{s: sk, addr: addr, buf: s.slab[start:s.used], seg: len(dg)})
	return nil
}

// train lays out a frame too large for one datagram as a train in the slab.
func (s *sender) train(sk *socket, addr *net.UDPAddr, f *tunnel.Frame, maxDg int) error {
	pkt := f.Packet()
	var frame []byte
	if f.Off >= DescLen {
		frame = f.Buf[f.Off-DescLen:]
	} else {
		frame = s.scratch[:DescLen+len(pkt)]
		copy(frame[DescLen:], pkt)
	}
	putDesc(frame, f.Offload)
	chunk := maxDg - HeaderLen
	count := (len(frame) + chunk - 1) / chunk
	if count > MaxSegments {
		s.t.ctr.Add(DropSend, 1)
		return nil
	}
	need := len(frame) + count*HeaderLen
	if s.used+need > len(s.slab) {
		if err := s.flush(); err != nil {
			return err
		}
	}
	s.frameID++
	start := s.used
	for i := 0; i < count; i++ {
		c := frame[i*chunk : min((i+1)*chunk, len(frame))]
		Header{Type: TypeFrame, FrameID: s.frameID, Index: uint8(i), Count: uint8(count)}.Marshal(s.slab[s.used:])
		s.used += HeaderLen + copy(s.slab[s.used+HeaderLen:], c)
	}
	s.pend = append(s.pend, pending{s: sk, addr: addr, buf: s.slab[start:s.used], seg: HeaderLen + chunk, closed: true})
	return nil
}

// addMsg appends one message for buf (a train of seg-size datagrams when
// seg > 0) to the send list.
func (s *sender) addMsg(addr *net.UDPAddr, buf []byte, seg int) {
	i := len(s.msgs)
	if i == len(s.iovs) {
		s.iovs = append(s.iovs, [1][]byte{})
		s.oobs = append(s.oobs, make([]byte, unix.CmsgSpace(2)))
	}
	s.iovs[i][0] = buf
	m := ipv4.Message{Buffers: s.iovs[i][:], Addr: addr}
	if seg > 0 && len(buf) > seg {
		m.OOB = putSegmentCmsg(s.oobs[i], uint16(seg))
	} else {
		seg = 0
	}
	s.msgs = append(s.msgs, m)
	s.segs = append(s.segs, seg)
}

// putSegmentCmsg writes a UDP_SEGMENT control message into b.
func putSegmentCmsg(b []byte, seg uint16) []byte {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], seg)
	return b[:unix.CmsgSpace(2)]
}

// flush sends everything pending, one sendmmsg run per socket.
func (s *sender) flush() error {
	defer func() {
		s.pend = s.pend[:0]
		s.used = 0
	}()
	for i := 0; i < len(s.pend); {
		sk := s.pend[i].s
		s.msgs, s.segs = s.msgs[:0], s.segs[:0]
		gso := !sk.gsoOff.Load()
		for ; i < len(s.pend) && s.pend[i].s == sk; i++ {
			p := s.pend[i]
			per := 1
			if gso {
				per = min(maxGSOSegments, maxGSOBytes/p.seg)
			}
			for b := p.buf; len(b) > 0; {
				n := min(len(b), per*p.seg)
				s.addMsg(p.addr, b[:n], p.seg)
				b = b[n:]
			}
		}
		if err := s.write(sk); err != nil {
			return err
		}
	}
	return nil
}

// write sends s.msgs on sk. A GSO send that fails with EIO (the egress
// device cannot checksum-offload) turns GSO off for the socket and resends
// the rest as plain datagrams; other per-message errors drop that message.
func (s *sender) write(sk *socket) error {
	ctr := s.t.ctr
	for i := 0; i < len(s.msgs); {
		n, err := sk.bc.WriteBatch(s.msgs[i:], 0)
		for j := i; j < i+n; j++ {
			ctr.Add(DatagramsOut, uint64(datagrams(len(s.msgs[j].Buffers[0]), s.segs[j])))
		}
		i += n
		if err == nil {
			continue
		}
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		if errors.Is(err, unix.EIO) && s.segs[i] > 0 && !sk.gsoOff.Swap(true) {
			ctr.Add(GSOFallbacks, 1)
			s.t.log.Warn("UDP GSO send failed with EIO; sending datagrams one by one from now on", "socket", sk.name)
		}
		if sk.gsoOff.Load() && s.segs[i] > 0 {
			s.splitFrom(i)
			continue
		}
		ctr.Add(DropSend, 1)
		i++
	}
	return nil
}

// splitFrom rewrites the GSO messages from index i on into single datagrams.
func (s *sender) splitFrom(i int) {
	type rest struct {
		addr *net.UDPAddr
		buf  []byte
		seg  int
	}
	var tail []rest
	for j := i; j < len(s.msgs); j++ {
		tail = append(tail, rest{s.msgs[j].Addr.(*net.UDPAddr), s.msgs[j].Buffers[0], s.segs[j]})
	}
	s.msgs, s.segs = s.msgs[:i], s.segs[:i]
	for _, r := range tail {
		if r.seg == 0 {
			s.addMsg(r.addr, r.buf, 0)
			continue
		}
		for b := r.buf; len(b) > 0; {
			n := min(len(b), r.seg)
			s.addMsg(r.addr, b[:n], 0)
			b = b[n:]
		}
	}
}

func datagrams(n, seg int) int {
	if seg == 0 {
		return 1
	}
	return (n + seg - 1) / seg
}
