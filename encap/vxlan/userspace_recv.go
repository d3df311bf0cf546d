package vxlan

import (
	"bytes"
	"encoding/binary"
	"net/netip"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/internal/inet"
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
// segments of one flow that follow f's in the current GRO message, in
// sequence, with equal headers and valid checksums, are slid together
// behind f's headers in place, and f becomes one super-packet for a
// single TUN write (TSO metadata, checksum left to the kernel). A segment
// that does not fit ends the run and is handled on its own.
func (r *vreceiver) coalesce(f *tunnel.Frame, buf []byte) {
	first := f.Packet()
	ip, hl, ok := segmentHeaders(first)
	if !ok || first[ip+13]&tcpPSH != 0 || !tcpChecksumValid(first, ip) {
		return
	}
	mss := len(first) - hl
	seq := binary.BigEndian.Uint32(first[ip+4:]) + uint32(mss)
	data := r.c.Data()
	end := f.Off + len(first)
	n, psh := 1, false
	for r.c.Off < len(data) {
		dg := data[r.c.Off:min(r.c.Off+r.c.Seg, len(data))]
		q, _, ok := r.inner(dg)
		if !ok || len(q) < hl || len(q)-hl > mss || end-f.Off+len(q)-hl > 65535 || !sameFlow(first, q, hl) ||
			binary.BigEndian.Uint32(q[ip+4:]) != seq {
			break
		}
		flags := q[ip+13]
		if flags != tcpACK && flags != tcpACK|tcpPSH {
			break
		}
		if tunnel.FinishUnfinished(q) {
			r.u.ctr.Add(ChecksumsFinished, 1)
		}
		if !tcpChecksumValid(q, ip) {
			break
		}
		end += copy(buf[end:], q[hl:])
		r.c.Off += len(dg)
		seq += uint32(len(q) - hl)
		n++
		psh = flags&tcpPSH != 0
		if psh || len(q)-hl < mss {
			break
		}
	}
	if n == 1 {
		return
	}
	p := buf[f.Off:end]
	gso := uint8(tunnel.GSOTCPv4)
	var src, dst []byte
	if p[0]>>4 == 4 {
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:], inet.Checksum(p[:ip], 0))
		src, dst = p[12:16], p[16:20]
	} else {
		gso = tunnel.GSOTCPv6
		binary.BigEndian.PutUint16(p[4:], uint16(len(p)-40))
		src, dst = p[8:24], p[24:40]
	}
	if psh {
		p[ip+13] |= tcpPSH
	}
	// Partial checksum, as the kernel leaves it for a device: the
	// pseudo-header sum, folded.
	binary.BigEndian.PutUint16(p[ip+16:], inet.Fold(inet.PseudoHeader(src, dst, 6, len(p)-ip)))
	f.Buf = buf[:end]
	f.Offload = tunnel.Offload{Flags: tunnel.FlagNeedsCsum, GSOType: gso, GSOSize: uint16(mss), CsumStart: uint16(ip), CsumOffset: 16}
	r.u.ctr.Add(Coalesced, uint64(n))
}

const (
	tcpACK = 0x10
	tcpPSH = 0x08
)

// segmentHeaders returns the IP header length and the IP + TCP header
// length of a TCP segment that can head a merge: IPv4 without options or
// fragmentation, or IPv6 without extension headers; flags ACK or ACK|PSH;
// some payload.
func segmentHeaders(p []byte) (ip, hl int, ok bool) {
	switch {
	case p[0] == 0x45 && p[9] == 6 && binary.BigEndian.Uint16(p[6:])&0x3fff == 0:
		ip = 20
	case p[0]>>4 == 6 && len(p) >= 60 && p[6] == 6:
		ip = 40
	default:
		return 0, 0, false
	}
	if len(p) < ip+20 {
		return 0, 0, false
	}
	th := int(p[ip+12]>>4) * 4
	if th < 20 || len(p) <= ip+th {
		return 0, 0, false
	}
	if f := p[ip+13]; f != tcpACK && f != tcpACK|tcpPSH {
		return 0, 0, false
	}
	return ip, ip + th, true
}

// sameFlow reports whether q continues p's flow with the same headers:
// IP fields but length, ID and checksum; TCP fields but sequence number,
// flags and checksum (options included).
func sameFlow(p, q []byte, hl int) bool {
	var ip int
	if p[0]>>4 == 4 {
		ip = 20
		if q[0] != p[0] || q[1] != p[1] || !bytes.Equal(q[6:10], p[6:10]) || !bytes.Equal(q[12:20], p[12:20]) {
			return false
		}
	} else {
		ip = 40
		if !bytes.Equal(q[:4], p[:4]) || !bytes.Equal(q[6:40], p[6:40]) {
			return false
		}
	}
	return bytes.Equal(q[ip:ip+4], p[ip:ip+4]) && bytes.Equal(q[ip+8:ip+13], p[ip+8:ip+13]) &&
		bytes.Equal(q[ip+14:ip+16], p[ip+14:ip+16]) && bytes.Equal(q[ip+18:hl], p[ip+18:hl])
}

// tcpChecksumValid checks the checksum of a TCP segment whose IP header
// is ip bytes long.
func tcpChecksumValid(p []byte, ip int) bool {
	var src, dst []byte
	if ip == 20 {
		src, dst = p[12:16], p[16:20]
	} else {
		src, dst = p[8:24], p[24:40]
	}
	return inet.Checksum(p[ip:], inet.PseudoHeader(src, dst, 6, len(p)-ip)) == 0
}
