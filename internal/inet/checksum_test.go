package inet

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// naive is RFC 1071 word by word.
func naive(b []byte, initial uint32) uint16 {
	s := initial
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func TestChecksumMatchesRFC1071(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 100, 1399, 1500, 65535} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		for _, init := range []uint32{0, 0x1234, 0xffff} {
			if got, want := Checksum(b, uint64(init)), naive(b, init); got != want {
				t.Errorf("len %d initial %#x: Checksum = %#04x, want %#04x", n, init, got, want)
			}
		}
	}
	// All ones stays all ones (no spurious carry).
	b := make([]byte, 64)
	for i := range b {
		b[i] = 0xff
	}
	if got, want := Checksum(b, 0), naive(b, 0); got != want {
		t.Errorf("all ones: %#04x, want %#04x", got, want)
	}
}

func TestPseudoHeader(t *testing.T) {
	src, dst := []byte{100, 64, 1, 2}, []byte{100, 64, 2, 3}
	var hdr []byte
	hdr = append(hdr, src...)
	hdr = append(hdr, dst...)
	hdr = append(hdr, 0, 6, 0x05, 0xdc)
	if got, want := Fold(PseudoHeader(src, dst, 6, 1500)), ^naive(hdr, 0); got != want {
		t.Errorf("PseudoHeader = %#04x, want %#04x", got, want)
	}
}

func BenchmarkChecksum(b *testing.B) {
	buf := make([]byte, 65536)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		Checksum(buf, 0)
	}
}
