package udp

import (
	"net"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// slabSize is the sender's layout buffer: a batch of frames as datagrams.
const slabSize = 1 << 20

// sender lays frames out as datagrams and sends them: the state of one
// Send call. Concurrent Sends (one per TUN queue) each take their own.
type sender struct {
	t       *Transport
	b       *udpsock.Batch
	scratch []byte
	addrs   udpsock.AddrCache
}

func newSender(t *Transport) *sender {
	return &sender{t: t, b: udpsock.NewBatch(slabSize), scratch: make([]byte, tunnel.BufSize+DescLen)}
}

// Send implements tunnel.Transport. Safe for concurrent use: each call
// lays out and sends its frames with a sender of its own.
func (t *Transport) Send(frames []tunnel.Frame) error {
	s := t.senders.Get()
	defer t.senders.Put(s)
	return s.send(frames)
}

// nextFrameID numbers frames per transport, not per sender: the receiver
// tells a peer's trains apart by ID, whichever queue sent them.
func (t *Transport) nextFrameID() uint16 { return uint16(t.frameID.Add(1)) }

func (s *sender) send(frames []tunnel.Frame) error {
	ctr := s.t.ctr
	for i := range frames {
		f := &frames[i]
		sk := s.t.socks.For(f.Addr)
		if sk == nil {
			ctr.Add(DropSend, 1)
			continue
		}
		var flags uint8
		if f.Sparse && sk.Sparse != nil {
			// What the sparse queue's loop read leaves from the sparse socket,
			// every datagram flagged, so the receiver reads it from its own
			// (ListenSteered) and a flow read there never has datagrams on
			// both of the receiver's sockets at once.
			sk, flags = sk.Sparse, FlagSparse
		}
		addr := s.addrs.Get(f.Addr)
		pkt := f.Packet()
		maxDg := sk.MaxPayload()
		switch {
		case f.Offload.None() && HeaderLen+len(pkt) <= maxDg && f.Off >= HeaderLen:
			b := f.Buf[f.Off-HeaderLen:]
			Header{Type: TypePacket, Count: 1, Flags: flags}.Marshal(b)
			if err := s.single(sk, addr, b); err != nil {
				return err
			}
		case Overhead+len(pkt) <= maxDg && f.Off >= Overhead:
			b := f.Buf[f.Off-Overhead:]
			Header{Type: TypeFrame, FrameID: s.t.nextFrameID(), Count: 1, Flags: flags}.Marshal(b)
			putDesc(b[HeaderLen:], f.Offload)
			if err := s.single(sk, addr, b); err != nil {
				return err
			}
		default:
			cut, err := tunnel.NewCutter(pkt, f.Offload, maxDg-Overhead)
			if err == nil {
				err = s.pieces(sk, addr, &cut, flags)
			} else {
				err = s.train(sk, addr, f, maxDg, flags)
			}
			if err != nil {
				return err
			}
		}
	}
	return s.flush()
}

// single queues one datagram; the batch joins it to the previous one when
// they share a peer and a size.
func (s *sender) single(sk *udpsock.Socket, addr *net.UDPAddr, dg []byte) error {
	if len(s.b.Room()) < len(dg) {
		if err := s.flush(); err != nil {
			return err
		}
	}
	s.b.Commit(sk, addr, copy(s.b.Room(), dg), len(dg))
	return nil
}

// pieces lays out a TSO/USO super-packet cut along its segments: every
// datagram a single-datagram frame holding whole segments, so a lost
// datagram costs the receiver only its own segments. The pieces but the
// last are one size, so they join one GSO send.
func (s *sender) pieces(sk *udpsock.Socket, addr *net.UDPAddr, cut *tunnel.Cutter, flags uint8) error {
	seg := Overhead + cut.PieceLen()
	room := s.b.Room()
	n := 0
	for {
		if len(room)-n < seg {
			if n > 0 {
				s.b.Commit(sk, addr, n, seg)
			}
			if err := s.flush(); err != nil {
				return err
			}
			room, n = s.b.Room(), 0
		}
		l, o, ok := cut.Next(room[n+Overhead:])
		if !ok {
			break
		}
		Header{Type: TypeFrame, FrameID: s.t.nextFrameID(), Count: 1, Flags: flags}.Marshal(room[n:])
		putDesc(room[n+HeaderLen:], o)
		n += Overhead + l
	}
	if n > 0 {
		s.b.Commit(sk, addr, n, seg)
	}
	s.t.ctr.Add(Cut, 1)
	return nil
}

// train lays out a frame too large for one datagram as a train in the slab.
func (s *sender) train(sk *udpsock.Socket, addr *net.UDPAddr, f *tunnel.Frame, maxDg int, flags uint8) error {
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
	if len(s.b.Room()) < need {
		if err := s.flush(); err != nil {
			return err
		}
	}
	id := s.t.nextFrameID()
	room, n := s.b.Room(), 0
	for i := 0; i < count; i++ {
		c := frame[i*chunk : min((i+1)*chunk, len(frame))]
		Header{Type: TypeFrame, FrameID: id, Index: uint8(i), Count: uint8(count), Flags: flags}.Marshal(room[n:])
		n += HeaderLen + copy(room[n+HeaderLen:], c)
	}
	s.b.Commit(sk, addr, n, HeaderLen+chunk)
	return nil
}

// flush sends everything pending, one sendmmsg run per socket.
func (s *sender) flush() error {
	ctr := s.t.ctr
	return s.b.Flush(func(sk *udpsock.Socket, r udpsock.Result) {
		ctr.Add(DatagramsOut, uint64(r.Datagrams))
		ctr.Add(DropSend, uint64(r.Dropped))
		if r.FellBack {
			ctr.Add(GSOFallbacks, 1)
			s.t.log.Warn("UDP GSO send failed with EIO; sending datagrams one by one from now on", "socket", sk.Name)
		}
	})
}
