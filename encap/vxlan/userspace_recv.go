package vxlan

import (
	"bytes"
	"encoding/binary"
	"net/netip"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/tunnel"
)

// recvBatch is how many messages one recvmmsg reads.
const recvBatch = 8

// vreceiver turns VXLAN datagrams into frames for one socket. Frames point
// into its buffers, valid until the next receive; a GRO message holding
// more datagrams than the caller has room for is handed out over several
// calls.
type vreceiver struct {
	u   *Userspace
	c   *udpsock.Cursor
	src netip.AddrPort // the peer endpoint of the current message
	co  tunnel.Coalescer
}

func newVReceiver(u *Userspace, read udpsock.ReadFunc) *vreceiver {
	r := &vreceiver{u: u}
	r.c = udpsock.NewCursor(read, recvBatch, tunnel.Headroom, 65536, func(src netip.AddrPort, dgs int) bool {
		u.ctr.Add(DatagramsIn, uint64(dgs))
		ep, ok := u.peers.Load().byIP[src.Addr()]
		if !ok {
			u.ctr.Add(DropUnknownSource, uint64(dgs))
			return false
		}
		r.src = ep
		return true
	})
	return r
}

func (r *vreceiver) receive(frames []tunnel.Frame) (int, error) {
	out := 0
	for out < len(frames) {
		if r.c.Done() {
			if out > 0 {
				return out, nil
			}
			if err := r.c.Fill(); err != nil {
				return 0, err
			}
			continue
		}
		base, dg := r.c.Take()
		if r.datagram(&frames[out], r.c.Buf(), base, dg) {
			out++
		}
		r.c.Settle()
	}
	return out, nil
}

// inner checks one VXLAN datagram and returns its inner IP packet
// (padding trimmed), or the counter its drop goes to.
func (r *vreceiver) inner(dg []byte) ([]byte, Counter, bool) {
	if len(dg) < EncapLen+20 || dg[0]&flagI == 0 {
		return nil, DropMalformed, false
	}
	if !bytes.Equal(dg[4:7], r.u.vni[:]) {
		return nil, DropBadVNI, false
	}
	eth := dg[HeaderLen:]
	if !bytes.Equal(eth[:6], r.u.cfg.MAC) {
		return nil, DropNotForUs, false
	}
	pkt := dg[EncapLen:]
	var l int
	switch binary.BigEndian.Uint16(eth[12:]) {
	case etherTypeIPv4:
		if pkt[0]>>4 != 4 {
			return nil, DropMalformed, false
		}
		l = int(binary.BigEndian.Uint16(pkt[2:]))
	case etherTypeIPv6:
		if pkt[0]>>4 != 6 || len(pkt) < 40 {
			return nil, DropMalformed, false
		}
		l = 40 + int(binary.BigEndian.Uint16(pkt[4:]))
	default:
		return nil, DropMalformed, false // ARP, VLAN tags: not in flannel's L3 model
	}
	if l < 20 || l > len(pkt) {
		return nil, DropMalformed, false
	}
	return pkt[:l], 0, true
}

// datagram checks one VXLAN datagram, found at buf[base:], and points f at
// its inner IP packet, merged with the TCP segments of the same flow that
// follow it in the message.
func (r *vreceiver) datagram(f *tunnel.Frame, buf []byte, base int, dg []byte) bool {
	pkt, why, ok := r.inner(dg)
	if !ok {
		r.u.ctr.Add(why, 1)
		return false
	}
	// A kernel VXLAN peer on a link that crosses no wire (veth, two VMs
	// on one host) sends inner checksums unfinished; the kernel's own
	// receiver trusts them, the TUN does not.
	if tunnel.FinishUnfinished(pkt) {
		r.u.ctr.Add(ChecksumsFinished, 1)
	}
	start := base + EncapLen
	f.Buf, f.Off, f.Offload, f.Addr = buf[:start+len(pkt)], start, tunnel.Offload{}, r.src
	r.coalesce(f, buf)
	return true
}

// coalesce does what the kernel's GRO does for a VXLAN device: the TCP
// segments of one flow that follow f's in the current GRO message (in
// sequence, equal headers, valid checksums) are slid together behind f's
// headers in place, and f becomes one super-packet for a single TUN write.
// A segment that does not fit ends the run and is handled on its own.
func (r *vreceiver) coalesce(f *tunnel.Frame, buf []byte) {
	co := &r.co
	if !co.Start(buf, f.Off, len(f.Buf), tunnel.Offload{}) {
		return
	}
	for dg := r.c.Peek(); dg != nil; dg = r.c.Peek() {
		q, _, ok := r.inner(dg)
		if !ok {
			break
		}
		if tunnel.FinishUnfinished(q) {
			r.u.ctr.Add(ChecksumsFinished, 1)
		}
		if !co.Add(q, tunnel.Offload{}) {
			break
		}
		r.c.Off += len(dg)
	}
	end, o, n := co.Finish()
	if n > 1 {
		f.Buf, f.Offload = buf[:end], o
		r.u.ctr.Add(Coalesced, uint64(n))
	}
}
