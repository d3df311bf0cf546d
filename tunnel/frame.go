// Package tunnel moves packets between the kernel and the underlay: it owns
// the TUN device, the peer table that maps an inner destination to the node
// owning it, the batched read/write loops, and the per-reason counters.
//
// tunnel does not know wire formats: a Transport (encap/udp) turns frames
// into datagrams and back. It owns the kernel state of the TUN path and of
// kernel-path peers (Router: the device's link state, MTU and addresses,
// the cluster routes through it, per-peer routes on the underlay), and
// recreates the device when it is deleted (ReopeningTUN). It never touches
// leases or other links' configuration: cmd/tulled feeds it peer tables and
// routes chosen by encap.
//
// The unit of work is a Frame: one IP packet as the kernel handed it to us,
// with its virtio-net offload metadata (TSO/USO super-packets stay whole,
// checksums stay partial), so a 64 KB TCP super-packet costs one TUN read and
// one TUN write end to end.
package tunnel

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// Headroom is the space every Frame buffer keeps in front of its packet, so
// the TUN device (10-byte virtio header) and transports (tulle header and
// descriptor) can prepend headers without copying the packet.
const Headroom = 32

// MaxPacket is the largest IP packet a frame carries (a TSO super-packet).
const MaxPacket = 65535

// BufSize is the size of a frame buffer.
const BufSize = Headroom + MaxPacket

// Virtio-net header values (linux/virtio_net.h).
const (
	VirtioHdrLen = 10

	FlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	FlagDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID

	GSONone  = 0 // VIRTIO_NET_HDR_GSO_NONE
	GSOTCPv4 = 1 // VIRTIO_NET_HDR_GSO_TCPV4
	GSOUDPL4 = 5 // VIRTIO_NET_HDR_GSO_UDP_L4
	GSOTCPv6 = 4 // VIRTIO_NET_HDR_GSO_TCPV6
	GSOECN   = 0x80
)

// Offload is a packet's offload metadata: the fields of a virtio_net_hdr
// except hdr_len, which receivers recompute instead of trusting.
type Offload struct {
	Flags      uint8
	GSOType    uint8
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
}

// None reports whether the packet is complete as it stands: no segmentation
// pending and no partial checksum to finish.
func (o Offload) None() bool { return o.GSOType == GSONone && o.Flags&FlagNeedsCsum == 0 }

// Frame is one IP packet plus offload metadata in a buffer with headroom.
type Frame struct {
	// Buf[Off:] is the IP packet; Buf[:Off] is scratch for headers.
	Buf []byte
	Off int
	// Offload is the packet's segmentation and checksum metadata.
	Offload Offload
	// Addr is the peer's underlay address: the destination when sending,
	// the source when receiving.
	Addr netip.AddrPort
	// Sparse: the tx loop read it from the sparse flows' queue (flows.go);
	// a transport may carry it ahead of bulk traffic.
	Sparse bool
}

// Packet returns the IP packet.
func (f *Frame) Packet() []byte { return f.Buf[f.Off:] }

// putVirtioHdr writes o as a virtio_net_hdr (native endian, as TUN without
// TUNSETVNETLE expects) into b[:VirtioHdrLen], with hdrLen.
func putVirtioHdr(b []byte, o Offload, hdrLen uint16) {
	b[0] = o.Flags
	b[1] = o.GSOType
	binary.NativeEndian.PutUint16(b[2:], hdrLen)
	binary.NativeEndian.PutUint16(b[4:], o.GSOSize)
	binary.NativeEndian.PutUint16(b[6:], o.CsumStart)
	binary.NativeEndian.PutUint16(b[8:], o.CsumOffset)
}

func getVirtioHdr(b []byte) Offload {
	return Offload{
		Flags:      b[0],
		GSOType:    b[1],
		GSOSize:    binary.NativeEndian.Uint16(b[4:]),
		CsumStart:  binary.NativeEndian.Uint16(b[6:]),
		CsumOffset: binary.NativeEndian.Uint16(b[8:]),
	}
}

// Errors from ValidateOffload; each maps to a drop counter.
var (
	ErrBadOffload = errors.New("invalid offload metadata")
)

// ValidateOffload checks o against the packet it describes and returns the
// header length (IP + transport header) to put in the virtio header. It is
// the gate between metadata from the network and the kernel: anything the
// kernel would have to guess about is rejected.
func ValidateOffload(pkt []byte, o Offload) (hdrLen uint16, err error) {
	if o == (Offload{}) {
		return 0, nil
	}
	if o.Flags&^FlagNeedsCsum != 0 {
		return 0, ErrBadOffload
	}
	v, ipHdr, ok := ipHeaderLen(pkt)
	if !ok {
		return 0, ErrBadOffload
	}
	if o.Flags&FlagNeedsCsum != 0 {
		// The checksum field must lie inside the transport header.
		if int(o.CsumStart) < ipHdr || int(o.CsumStart)+int(o.CsumOffset)+2 > len(pkt) {
			return 0, ErrBadOffload
		}
	}
	gso := o.GSOType &^ GSOECN
	switch gso {
	case GSONone:
		if o.GSOSize != 0 || o.GSOType&GSOECN != 0 {
			return 0, ErrBadOffload
		}
		return 0, nil
	case GSOTCPv4, GSOTCPv6:
		if (gso == GSOTCPv4) != (v == 4) || pkt[protoOffset(v)] != 6 {
			return 0, ErrBadOffload
		}
	case GSOUDPL4:
		if o.GSOType&GSOECN != 0 || pkt[protoOffset(v)] != 17 {
			return 0, ErrBadOffload
		}
	default:
		return 0, ErrBadOffload
	}
	if o.Flags&FlagNeedsCsum == 0 || o.GSOSize == 0 || int(o.CsumStart) != ipHdr {
		return 0, ErrBadOffload
	}
	l4 := 8
	if gso != GSOUDPL4 {
		if len(pkt) < ipHdr+20 {
			return 0, ErrBadOffload
		}
		l4 = int(pkt[ipHdr+12]>>4) * 4
		if l4 < 20 {
			return 0, ErrBadOffload
		}
	}
	hl := ipHdr + l4
	if hl > len(pkt) {
		return 0, ErrBadOffload
	}
	return uint16(hl), nil
}

// ipHeaderLen returns the IP version and the offset of the transport header.
// IPv6 extension headers are not walked: offloaded IPv6 packets from Linux
// have none, and anything else is rejected as an offload candidate.
func ipHeaderLen(pkt []byte) (version, hdrLen int, ok bool) {
	if len(pkt) < 20 {
		return 0, 0, false
	}
	switch pkt[0] >> 4 {
	case 4:
		ihl := int(pkt[0]&0x0f) * 4
		if ihl < 20 || ihl > len(pkt) {
			return 0, 0, false
		}
		return 4, ihl, true
	case 6:
		if len(pkt) < 40 {
			return 0, 0, false
		}
		return 6, 40, true
	}
	return 0, 0, false
}

func protoOffset(v int) int {
	if v == 4 {
		return 9
	}
	return 6
}

// Addrs returns the source and destination addresses of an IP packet.
func Addrs(pkt []byte) (src, dst netip.Addr, ok bool) {
	if len(pkt) < 20 {
		return src, dst, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if pkt[0]&0x0f < 5 {
			return src, dst, false
		}
		return netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20])), true
	case 6:
		if len(pkt) < 40 {
			return src, dst, false
		}
		return netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return src, dst, false
}
