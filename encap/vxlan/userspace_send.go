package vxlan

import (
	"errors"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// sendSlab holds a batch of frames as datagrams: 16 super-packets with
// their per-segment headers.
const sendSlab = 2 << 20

// vsender lays frames out as VXLAN datagrams and sends them: the state of
// one Send call. Concurrent Sends (one per TUN queue) each take their own.
type vsender struct {
	u     *Userspace
	b     *udpsock.Batch
	addrs udpsock.AddrCache
}

func newVSender(u *Userspace) *vsender {
	return &vsender{u: u, b: udpsock.NewBatch(sendSlab)}
}

func (s *vsender) send(frames []tunnel.Frame) error {
	ctr := s.u.ctr
	peers := s.u.peers.Load()
	for i := range frames {
		f := &frames[i]
		h := peers.byAddr[f.Addr]
		sk := s.u.socks.For(f.Addr)
		if h == nil || sk == nil {
			ctr.Add(DropNoPeer, 1)
			continue
		}
		pkt := f.Packet()
		prefix := h.v4[:]
		if pkt[0]>>4 == 6 {
			prefix = h.v6[:]
		}
		n, seg, err := tunnel.Segment(s.b.Room(), pkt, prefix, f.Offload)
		if errors.Is(err, tunnel.ErrNoRoom) && !s.b.Empty() {
			if err := s.flush(); err != nil {
				return err
			}
			n, seg, err = tunnel.Segment(s.b.Room(), pkt, prefix, f.Offload)
		}
		switch {
		case errors.Is(err, tunnel.ErrBadOffload):
			ctr.Add(DropOffload, 1)
			continue
		case err != nil:
			ctr.Add(DropTooBig, 1)
			continue
		case seg > sk.MaxPayload():
			// Segments the underlay cannot carry: the TUN MTU is sized for
			// VXLAN, so only a shrinking underlay gets here.
			ctr.Add(DropTooBig, 1)
			continue
		}
		if n > seg {
			ctr.Add(Segmented, 1)
		}
		s.b.Commit(sk, s.addrs.Get(f.Addr), n, seg)
	}
	return s.flush()
}

func (s *vsender) flush() error {
	ctr := s.u.ctr
	return s.b.Flush(func(sk *udpsock.Socket, r udpsock.Result) {
		ctr.Add(DatagramsOut, uint64(r.Datagrams))
		ctr.Add(DropSend, uint64(r.Dropped))
		if r.FellBack {
			ctr.Add(GSOFallbacks, 1)
			s.u.log.Warn("UDP GSO send failed with EIO; sending VXLAN datagrams one by one from now on", "socket", sk.Name)
		}
	})
}
