// Package inet computes Internet checksums (RFC 1071) for the datapath:
// the sum over a buffer, the TCP/UDP pseudo-header, and folding. Sums are
// kept unfolded in a uint64 so a pseudo-header, a header and a payload can
// be added before one fold.
package inet

import (
	"encoding/binary"
	"math/bits"
)

// Sum adds the 16-bit big-endian words of b to initial (unfolded). An odd
// trailing byte counts as the high byte of a word.
func Sum(b []byte, initial uint64) uint64 {
	// Native-endian 64-bit adds with end-around carry; one byte swap at
	// the end turns the native sum into the big-endian one (RFC 1071 §2B).
	var ac, carry uint64
	for len(b) >= 32 {
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b), 0)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[8:]), carry)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[16:]), carry)
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b[24:]), carry)
		ac += carry
		b = b[32:]
	}
	for len(b) >= 8 {
		ac, carry = bits.Add64(ac, binary.NativeEndian.Uint64(b), 0)
		ac += carry
		b = b[8:]
	}
	if len(b) >= 4 {
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint32(b)), 0)
		ac += carry
		b = b[4:]
	}
	if len(b) >= 2 {
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint16(b)), 0)
		ac += carry
		b = b[2:]
	}
	if len(b) == 1 {
		var w [2]byte
		w[0] = b[0]
		ac, carry = bits.Add64(ac, uint64(binary.NativeEndian.Uint16(w[:])), 0)
		ac += carry
	}
	f := fold(ac)
	if littleEndian {
		f = bits.ReverseBytes16(f)
	}
	s, c := bits.Add64(initial, uint64(f), 0)
	return s + c
}

// littleEndian: the native sum is byte-swapped from the big-endian one.
var littleEndian = binary.NativeEndian.Uint16([]byte{0, 1}) != 1

func fold(s uint64) uint16 {
	s = s&0xffffffff + s>>32
	s = s&0xffffffff + s>>32
	s = s&0xffff + s>>16
	s = s&0xffff + s>>16
	return uint16(s)
}

// Fold folds an unfolded sum to 16 bits.
func Fold(s uint64) uint16 { return fold(s) }

// Checksum is the Internet checksum of b with initial: the complement of
// the folded sum, as it goes into a header.
func Checksum(b []byte, initial uint64) uint16 { return ^fold(Sum(b, initial)) }

// PseudoHeader is the unfolded sum of the TCP/UDP pseudo-header: source and
// destination addresses (4 or 16 bytes each), protocol and L4 length.
func PseudoHeader(src, dst []byte, proto uint8, length int) uint64 {
	return Sum(src, Sum(dst, uint64(proto)+uint64(length)))
}
