package tunnel

import (
	"encoding/binary"
	"errors"

	"github.com/tulle-net/tulle/internal/inet"
)

// ErrNoRoom is returned by Segment when the output buffer is too small.
var ErrNoRoom = errors.New("segment: output buffer too small")

// TCP flags Segment adjusts.
const (
	tcpFIN = 0x01
	tcpPSH = 0x08
	tcpCWR = 0x80
)

// Segment does in software what a NIC does with a TSO/USO super-packet: it
// cuts pkt (with offload o) into wire packets with complete headers and
// checksums, as the kernel's own GSO would (IPv4 ID incremented per
// segment, TCP sequence numbers advanced, FIN and PSH on the last segment
// only, CWR on the first only). Each packet is written to out preceded by a
// copy of prefix (an encapsulation header). A packet without segmentation
// has its partial checksum, if any, finished. It returns the bytes written
// and the size of every datagram but the last (prefix + packet), which is
// the shape one UDP GSO send takes.
func Segment(out, pkt, prefix []byte, o Offload) (n, seg int, err error) {
	hdrLen, err := ValidateOffload(pkt, o)
	if err != nil {
		return 0, 0, err
	}
	if o.GSOType == GSONone {
		if len(prefix)+len(pkt) > len(out) {
			return 0, 0, ErrNoRoom
		}
		n = copy(out, prefix)
		p := out[n : n+len(pkt)]
		copy(p, pkt)
		if o.Flags&FlagNeedsCsum != 0 {
			finishCsum(p, int(o.CsumStart), int(o.CsumOffset))
		}
		return n + len(pkt), n + len(pkt), nil
	}
	hl := int(hdrLen)
	ip := int(o.CsumStart)
	mss := int(o.GSOSize)
	payload := pkt[hl:]
	count := (len(payload) + mss - 1) / mss
	if count == 0 {
		count = 1 // a header-only super-packet goes out as is
	}
	if count*(len(prefix)+hl)+len(payload) > len(out) {
		return 0, 0, ErrNoRoom
	}
	v4 := pkt[0]>>4 == 4
	tcp := o.GSOType&^GSOECN != GSOUDPL4
	var src, dst []byte
	proto := uint8(17)
	if tcp {
		proto = 6
	}
	if v4 {
		src, dst = pkt[12:16], pkt[16:20]
	} else {
		src, dst = pkt[8:24], pkt[24:40]
	}
	var id uint16
	var seq uint32
	if v4 {
		id = binary.BigEndian.Uint16(pkt[4:])
	}
	if tcp {
		seq = binary.BigEndian.Uint32(pkt[ip+4:])
	}
	csumAt := ip + int(o.CsumOffset)
	for i := range count {
		chunk := payload[min(i*mss, len(payload)):min((i+1)*mss, len(payload))]
		n += copy(out[n:], prefix)
		s := out[n : n+hl+len(chunk)]
		copy(s, pkt[:hl])
		copy(s[hl:], chunk)
		n += len(s)
		if v4 {
			binary.BigEndian.PutUint16(s[2:], uint16(len(s)))
			binary.BigEndian.PutUint16(s[4:], id+uint16(i))
			s[10], s[11] = 0, 0
			binary.BigEndian.PutUint16(s[10:], inet.Checksum(s[:ip], 0))
		} else {
			binary.BigEndian.PutUint16(s[4:], uint16(len(s)-40))
		}
		l4 := s[ip:]
		if tcp {
			binary.BigEndian.PutUint32(l4[4:], seq+uint32(i*mss))
			if i < count-1 {
				l4[13] &^= tcpFIN | tcpPSH
			}
			if i > 0 {
				l4[13] &^= tcpCWR
			}
		} else {
			binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		}
		s[csumAt], s[csumAt+1] = 0, 0
		c := inet.Checksum(l4, inet.PseudoHeader(src, dst, proto, len(l4)))
		if !tcp && c == 0 {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(s[csumAt:], c)
		if i == 0 {
			seg = len(prefix) + len(s)
		}
	}
	return n, seg, nil
}

// finishCsum completes a partial checksum: the field holds the
// pseudo-header sum, the device adds the rest.
func finishCsum(p []byte, start, off int) {
	at := start + off
	initial := uint64(binary.BigEndian.Uint16(p[at:]))
	p[at], p[at+1] = 0, 0
	c := inet.Checksum(p[start:], initial)
	if c == 0 && p[protoOffset(int(p[0]>>4))] == 17 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(p[at:], c)
}

// FinishUnfinished completes the TCP or UDP checksum of a packet whose
// sender left it for a device to finish and no device did: the field
// still holds the pseudo-header sum. Linux hands such packets on where no
// wire is crossed (a veth, a virtio-net link between two VMs on one host),
// and a kernel VXLAN device there encapsulates them unfinished; a kernel
// receiver trusts them, a userspace receiver must finish them. A complete
// packet whose checksum happens to equal its pseudo-header sum is left as
// it was (finishing it computes the same value). It reports whether pkt
// was changed.
func FinishUnfinished(pkt []byte) bool {
	v, ip, ok := ipHeaderLen(pkt)
	if !ok {
		return false
	}
	var src, dst []byte
	var proto uint8
	if v == 4 {
		if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 {
			return false // a fragment: no whole L4 header to check
		}
		src, dst, proto = pkt[12:16], pkt[16:20], pkt[9]
	} else {
		src, dst, proto = pkt[8:24], pkt[24:40], pkt[6]
	}
	off := 16
	switch {
	case proto == 17:
		off = 6
	case proto != 6:
		return false
	}
	if len(pkt) < ip+off+2 {
		return false
	}
	field := binary.BigEndian.Uint16(pkt[ip+off:])
	if field == 0 || field != inet.Fold(inet.PseudoHeader(src, dst, proto, len(pkt)-ip)) {
		return false
	}
	finishCsum(pkt, ip, off)
	return true
}
