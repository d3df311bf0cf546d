package udp

import (
	"net"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// slabSize is the sender's layout buffer: a batch of frames as datagrams.
const slabSize = 1 << 20

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
	w       udpsock.Writer
	addrs   udpsock.AddrCache
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
		addr := s.addrs.Get(f.Addr)
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
			len(p.buf)/p.seg < udpsock.MaxGSOSegments && len(p.buf)+len(dg) <= udpsock.MaxGSOBytes && &p.buf[len(p.buf)-1] == &s.slab[start-1] {
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

// flush sends everything pending, one sendmmsg run per socket.
func (s *sender) flush() error {
	defer func() {
		s.pend = s.pend[:0]
		s.used = 0
	}()
	ctr := s.t.ctr
	for i := 0; i < len(s.pend); {
		sk := s.pend[i].s
		for ; i < len(s.pend) && s.pend[i].s == sk; i++ {
			p := s.pend[i]
			s.w.Add(sk.Socket, p.addr, p.buf, p.seg)
		}
		r, err := s.w.Flush(sk.Socket)
		ctr.Add(DatagramsOut, uint64(r.Datagrams))
		ctr.Add(DropSend, uint64(r.Dropped))
		if r.FellBack {
			ctr.Add(GSOFallbacks, 1)
			s.t.log.Warn("UDP GSO send failed with EIO; sending datagrams one by one from now on", "socket", sk.Name)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
