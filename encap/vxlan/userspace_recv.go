package vxlan

import (
	"bytes"
	"encoding/binary"
	"net/netip"

	"golang.org/x/net/ipv4"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

const (
	recvBatch   = 8
	recvBufSize = tunnel.Headroom + 65536
)

type readFunc func(ms []ipv4.Message, flags int) (int, error)

// vreceiver turns VXLAN datagrams into frames for one socket. Frames point
// into its buffers, valid until the next receive; a GRO message holding
// more datagrams than the caller has room for is handed out over several
// calls.
type vreceiver struct {
	u    *Userspace
	read readFunc
	msgs []ipv4.Message
	iovs [][1][]byte
	bufs [][]byte
	oobs [][]byte

	n, mi int            // messages in the batch, current message
	off   int            // offset of the next datagram in the current message
	seg   int            // datagram size of the current message
	src   netip.AddrPort // the peer endpoint of the current message
}

func newVReceiver(u *Userspace, read readFunc) *vreceiver {
	r := &vreceiver{u: u, read: read}
	r.msgs = make([]ipv4.Message, recvBatch)
	r.iovs = make([][1][]byte, recvBatch)
	r.bufs = make([][]byte, recvBatch)
	r.oobs = make([][]byte, recvBatch)
	for i := range r.msgs {
		r.bufs[i] = make([]byte, recvBufSize)
		r.oobs[i] = make([]byte, udpsock.OOBSize)
	}
	return r
}

func (r *vreceiver) receive(frames []tunnel.Frame) (int, error) {
	out := 0
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
		if r.datagram(&frames[out], r.bufs[r.mi], base, dg) {
			out++
		}
		if r.off >= len(data) {
			r.next()
		}
	}
	return out, nil
}

func (r *vreceiver) fill() error {
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

// next moves to the next message from a VXLAN peer.
func (r *vreceiver) next() {
	ctr := r.u.ctr
	peers := r.u.peers.Load()
	for r.mi++; r.mi < r.n; r.mi++ {
		m := &r.msgs[r.mi]
		r.off = 0
		r.seg = udpsock.GROSize(m.OOB[:m.NN])
		if r.seg <= 0 || r.seg > m.N {
			r.seg = m.N
		}
		src, ok := udpsock.Source(m)
		if !ok || m.N == 0 {
			continue
		}
		dgs := uint64((m.N + r.seg - 1) / r.seg)
		ctr.Add(DatagramsIn, dgs)
		ep, ok := peers.byIP[src.Addr()]
		if !ok {
			ctr.Add(DropUnknownSource, dgs)
			continue
		}
		r.src = ep
		return
	}
}

// datagram checks one VXLAN datagram, found at buf[base:], and points f at
// its inner IP packet.
func (r *vreceiver) datagram(f *tunnel.Frame, buf []byte, base int, dg []byte) bool {
	ctr := r.u.ctr
	if len(dg) < EncapLen+20 || dg[0]&flagI == 0 {
		ctr.Add(DropMalformed, 1)
		return false
	}
	if !bytes.Equal(dg[4:7], r.u.vni[:]) {
		ctr.Add(DropBadVNI, 1)
		return false
	}
	eth := dg[HeaderLen:]
	if !bytes.Equal(eth[:6], r.u.cfg.MAC) {
		ctr.Add(DropNotForUs, 1)
		return false
	}
	pkt := dg[EncapLen:]
	var l int
	switch binary.BigEndian.Uint16(eth[12:]) {
	case etherTypeIPv4:
		if pkt[0]>>4 != 4 {
			ctr.Add(DropMalformed, 1)
			return false
		}
		l = int(binary.BigEndian.Uint16(pkt[2:]))
	case etherTypeIPv6:
		if pkt[0]>>4 != 6 || len(pkt) < 40 {
			ctr.Add(DropMalformed, 1)
			return false
		}
		l = 40 + int(binary.BigEndian.Uint16(pkt[4:]))
	default:
		ctr.Add(DropMalformed, 1) // ARP, VLAN tags: not in flannel's L3 model
		return false
	}
	if l < 20 || l > len(pkt) {
		ctr.Add(DropMalformed, 1)
		return false
	}
	// A kernel VXLAN peer on a link that crosses no wire (veth, two VMs
	// on one host) sends inner checksums unfinished; the kernel's own
	// receiver trusts them, the TUN does not.
	if tunnel.FinishUnfinished(pkt[:l]) {
		ctr.Add(ChecksumsFinished, 1)
	}
	// Ethernet padding, if a sender added any, is trimmed.
	start := base + EncapLen
	f.Buf, f.Off, f.Offload, f.Addr = buf[:start+l], start, tunnel.Offload{}, r.src
	return true
}
