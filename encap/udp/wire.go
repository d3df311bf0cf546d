// Package udp is tulle's userspace UDP transport: it carries frames between
// nodes as UDP datagrams, batched with sendmmsg/recvmmsg, with UDP GSO
// (UDP_SEGMENT) on send and UDP GRO on receive, over an IPv4 or IPv6
// underlay. The wire format is documented in docs/wire-format.md.
//
// A frame that fits in one datagram travels alone. A TSO/USO super-packet
// (up to 64 KB) is cut along its segments into smaller super-packets that
// each fill one datagram (tunnel.Cutter), sent together in one sendmsg
// with UDP_SEGMENT; the receiver merges the pieces that arrive, in order,
// back into super-packets (tunnel.Coalescer) and the kernel finishes
// segmentation and checksums on the far side. A lost datagram costs only
// its own segments. A frame that cannot be cut that way travels as a
// train: equal-size slices of the frame, rebuilt whole or not at all.
//
// The package owns its sockets and nothing else. It drops (and counts)
// datagrams from addresses the Accept function refuses before keeping any
// state for them; inner-packet checks are the datapath's.
package udp

import (
	"encoding/binary"
	"errors"

	"github.com/tulle-net/tulle/tunnel"
)

// Wire constants.
const (
	Version = 1

	// TypePacket: the payload is one complete IP packet (checksums done).
	TypePacket = 1
	// TypeFrame: the payload is slice Index of Count of a frame; a frame is
	// an 8-byte offload descriptor followed by the IP packet.
	TypeFrame = 2

	HeaderLen = 8
	DescLen   = 8

	// Overhead is what the transport adds inside the UDP payload in the
	// worst single-datagram case (header + descriptor).
	Overhead = HeaderLen + DescLen

	// MaxSegments caps a train (the header's 8-bit count).
	MaxSegments = 255
)

// Header is the tulle header at the start of every datagram.
//
//	0      version (4 bits) | type (4 bits)
//	1      header length in 4-byte words (2 in version 1)
//	2..3   frame id (big endian), per sender
//	4      segment index
//	5      segment count
//	6      flags: FlagSparse; other bits zero, ignored by receivers
//	7      reserved, zero; ignored by receivers
type Header struct {
	Type    uint8
	Len     int // header length in bytes (≥ HeaderLen); receivers skip what they do not know
	FrameID uint16
	Index   uint8
	Count   uint8
	Flags   uint8
}

// FlagSparse marks a datagram of a sparse flow (a ping, a request, an
// ACK-clocked exchange: what the sender read from its sparse TUN queue).
// A receiver may read it ahead of bulk datagrams; one that does not know
// the flag treats it as any other. Every datagram of such a frame (a
// train's, a cut super-packet's pieces) carries it.
const FlagSparse = 1

// flagsOffset is where the flags byte sits in a datagram's UDP payload:
// the receiver's socket-steering program reads it there.
const flagsOffset = 6

// Errors from ParseHeader and ParseDesc.
var (
	ErrShort      = errors.New("datagram too short for a tulle header")
	ErrVersion    = errors.New("unknown tulle header version")
	ErrBadHeader  = errors.New("inconsistent tulle header")
	ErrDescriptor = errors.New("invalid offload descriptor")
)

// Marshal writes h into b[:HeaderLen] as version 1.
func (h Header) Marshal(b []byte) {
	b[0] = Version<<4 | h.Type&0x0f
	b[1] = HeaderLen / 4
	binary.BigEndian.PutUint16(b[2:], h.FrameID)
	b[4] = h.Index
	b[5] = h.Count
	b[6], b[7] = h.Flags, 0
}

// ParseHeader decodes the header at the start of d.
func ParseHeader(d []byte) (Header, error) {
	if len(d) < HeaderLen {
		return Header{}, ErrShort
	}
	if d[0]>>4 != Version {
		return Header{}, ErrVersion
	}
	h := Header{
		Type:    d[0] & 0x0f,
		Len:     int(d[1]) * 4,
		FrameID: binary.BigEndian.Uint16(d[2:]),
		Index:   d[4],
		Count:   d[5],
		Flags:   d[6],
	}
	if h.Len < HeaderLen || h.Len > len(d) || h.Count == 0 || h.Index >= h.Count {
		return Header{}, ErrBadHeader
	}
	switch h.Type {
	case TypePacket:
		if h.Count != 1 {
			return Header{}, ErrBadHeader
		}
	case TypeFrame:
	default:
		return Header{}, ErrBadHeader
	}
	return h, nil
}

// Descriptor layout (big endian), first 8 bytes of every frame:
//
//	0  virtio flags    1  GSO type
//	2  GSO size        4  checksum start   6  checksum offset
func putDesc(b []byte, o tunnel.Offload) {
	b[0], b[1] = o.Flags, o.GSOType
	binary.BigEndian.PutUint16(b[2:], o.GSOSize)
	binary.BigEndian.PutUint16(b[4:], o.CsumStart)
	binary.BigEndian.PutUint16(b[6:], o.CsumOffset)
}

func parseDesc(b []byte) (tunnel.Offload, error) {
	if len(b) < DescLen {
		return tunnel.Offload{}, ErrDescriptor
	}
	return tunnel.Offload{
		Flags:      b[0],
		GSOType:    b[1],
		GSOSize:    binary.BigEndian.Uint16(b[2:]),
		CsumStart:  binary.BigEndian.Uint16(b[4:]),
		CsumOffset: binary.BigEndian.Uint16(b[6:]),
	}, nil
}
