package wireguard

import (
	"encoding/binary"
	"net"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// slabSize is a sender's layout buffer: a batch of frames as messages.
const slabSize = 1 << 20

// sender seals frames into transport messages and sends them: the state
// of one Send call. Concurrent Sends (one per TUN queue) take their own.
type sender struct {
	t     *Transport
	b     *udpsock.Batch
	nonce []byte // 12 bytes, reused: no allocation per Seal
	addrs udpsock.AddrCache
}

func newSender(t *Transport) *sender {
	return &sender{t: t, b: udpsock.NewBatch(slabSize), nonce: make([]byte, 12)}
}

// Send implements tunnel.Transport. Safe for concurrent use.
func (t *Transport) Send(frames []tunnel.Frame) error {
	s := t.senders.Get()
	defer t.senders.Put(s)
	return s.send(frames)
}

func padded(n int) int { return (n + padding - 1) &^ (padding - 1) }

func (s *sender) send(frames []tunnel.Frame) error {
	t := s.t
	ctr := t.ctr
	now := mono()
	snap := t.peers.Load()
	for i := range frames {
		f := &frames[i]
		p := snap.byEndpoint[f.Addr]
		if p == nil {
			ctr.Add(DropNoPeer, 1)
			continue
		}
		if _, dst, _ := tunnel.Addrs(f.Packet()); !p.allows(dst) {
			// Sealed only for the key that owns the destination.
			ctr.Add(DropAllowedIPs, 1)
			continue
		}
		kp := p.cur.Load()
		if !kp.canSend(now, &t.timers) {
			p.stage(f)
			p.kick()
			continue
		}
		ep := *p.endpoint.Load()
		sk := t.socks.For(ep)
		if sk == nil {
			ctr.Add(DropSend, 1)
			continue
		}
		segs, err := tunnel.NewSegments(f.Packet(), f.Offload)
		if err != nil {
			ctr.Add(DropSend, 1)
			continue
		}
		if err := s.seal(sk, s.addrs.Get(ep), kp, &segs); err != nil {
			return err
		}
		p.sent(now)
		if p.waitingSince.Load() == 0 {
			p.waitingSince.CompareAndSwap(0, now)
		}
		if kp.initiator && (now-kp.created >= int64(t.timers.RekeyAfterTime) || kp.nonce.Load() >= t.timers.RekeyAfterMessages) {
			p.kick()
		}
	}
	return s.flush()
}

// seal lays out every segment of a frame as a transport message, sealed
// in place, and commits them as one train: all messages but the last are
// one size, so they leave in one UDP GSO send.
func (s *sender) seal(sk *udpsock.Socket, addr *net.UDPAddr, kp *keypair, segs *tunnel.Segments) error {
	// Padding to 16 bytes never takes a message past the path, as the
	// kernel's WireGuard caps it at the MTU: every message but the last
	// stays one size.
	maxPlain := sk.MaxPayload() - Overhead
	if segs.MaxLen() > maxPlain {
		// Larger than the path takes (the TUN MTU has not followed an
		// underlay change yet).
		s.t.ctr.Add(DropSend, 1)
		return nil
	}
	seg := HeaderLen + min(padded(segs.MaxLen()), maxPlain) + TagLen
	room, n := s.b.Room(), 0
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
		m := room[n:]
		l, ok := segs.Next(m[HeaderLen:])
		if !ok {
			break
		}
		pl := min(padded(l), maxPlain)
		clear(m[HeaderLen+l : HeaderLen+pl])
		n += s.message(m, kp, pl)
	}
	if n > 0 {
		s.b.Commit(sk, addr, n, seg)
	}
	return nil
}

// message seals the pl bytes of plaintext at m[HeaderLen:] as a transport
// message of kp and returns its length.
func (s *sender) message(m []byte, kp *keypair, pl int) int {
	c := kp.nonce.Add(1) - 1
	binary.LittleEndian.PutUint32(m[0:], typeTransport)
	binary.LittleEndian.PutUint32(m[4:], kp.remote)
	binary.LittleEndian.PutUint64(m[8:], c)
	binary.LittleEndian.PutUint64(s.nonce[4:], c)
	kp.send.Seal(m[HeaderLen:HeaderLen], s.nonce, m[HeaderLen:HeaderLen+pl], nil)
	return HeaderLen + pl + TagLen
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

// keepalive sends an empty transport message on p's current session.
func (s *sender) keepalive(p *peer, kp *keypair) error {
	ep := *p.endpoint.Load()
	sk := s.t.socks.For(ep)
	if sk == nil {
		return nil
	}
	m := s.b.Room()
	n := s.message(m, kp, 0)
	s.b.Commit(sk, s.addrs.Get(ep), n, n)
	p.sent(mono())
	s.t.ctr.Add(KeepalivesSent, 1)
	return s.flush()
}
