package tunnel

import (
	"encoding/binary"
	"net/netip"

	"github.com/tulle-net/tulle/internal/inet"
)

// tooBig writes into out (which must have room for 1280 bytes) an ICMP
// "fragmentation needed" (IPv4) or ICMPv6 "packet too big" answering pkt,
// from address from, announcing mtu. It returns the packet length, or 0 when
// pkt must not be answered (not DF, an ICMP error itself, no source).
func tooBig(out, pkt []byte, from netip.Addr, mtu int) int {
	src, _, ok := Addrs(pkt)
	if !ok || !src.IsGlobalUnicast() && !src.IsPrivate() && !src.IsLinkLocalUnicast() {
		return 0
	}
	if pkt[0]>>4 == 4 {
		if binary.BigEndian.Uint16(pkt[6:])&0x4000 == 0 || !from.Is4() {
			return 0 // DF clear: the transport may carry it whole
		}
		ihl := int(pkt[0]&0x0f) * 4
		if pkt[9] == 1 && len(pkt) > ihl && pkt[ihl] != 8 && pkt[ihl] != 0 {
			return 0 // never answer an ICMP error
		}
		quote := min(len(pkt), ihl+8)
		n := 20 + 8 + quote
		h := out[:n]
		clear(h[:28])
		h[0], h[8], h[9] = 0x45, 64, 1
		binary.BigEndian.PutUint16(h[2:], uint16(n))
		f4 := from.As4()
		s4 := src.As4()
		copy(h[12:16], f4[:])
		copy(h[16:20], s4[:])
		binary.BigEndian.PutUint16(h[10:], inet.Checksum(h[:20], 0))
		ic := h[20:]
		ic[0], ic[1] = 3, 4 // destination unreachable, fragmentation needed
		binary.BigEndian.PutUint16(ic[6:], uint16(mtu))
		copy(ic[8:], pkt[:quote])
		binary.BigEndian.PutUint16(ic[2:], inet.Checksum(ic[:8+quote], 0))
		return n
	}
	if !from.Is6() || pkt[6] == 58 && len(pkt) > 40 && pkt[40] < 128 {
		return 0 // never answer an ICMPv6 error
	}
	quote := min(len(pkt), 1280-40-8)
	n := 40 + 8 + quote
	h := out[:n]
	clear(h[:48])
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(8+quote))
	h[6], h[7] = 58, 64
	f16, s16 := from.As16(), src.As16()
	copy(h[8:24], f16[:])
	copy(h[24:40], s16[:])
	ic := h[40:]
	ic[0] = 2 // packet too big
	binary.BigEndian.PutUint32(ic[4:], uint32(mtu))
	copy(ic[8:], pkt[:quote])
	binary.BigEndian.PutUint16(ic[2:], inet.Checksum(ic[:8+quote], inet.PseudoHeader(h[8:24], h[24:40], 58, 8+quote)))
	return n
}
