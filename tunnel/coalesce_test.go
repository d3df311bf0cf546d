package tunnel_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// cutAndMerge cuts a super-packet into pieces of at most maxLen bytes,
// delivers the pieces listed in order (losses, reordering, duplicates) one
// after another in one buffer, merges them as a receiver does, and checks
// that the merged packets carry exactly the delivered pieces' segments.
// It returns the number of merged packets.
func cutAndMerge(t *testing.T, pkt []byte, o tunnel.Offload, maxLen int, order []int) int {
	t.Helper()
	cut, err := tunnel.NewCutter(pkt, o, maxLen)
	if err != nil {
		t.Fatal(err)
	}
	type piece struct {
		p []byte
		o tunnel.Offload
	}
	var pieces []piece
	for {
		b := make([]byte, cut.PieceLen())
		n, po, ok := cut.Next(b)
		if !ok {
			break
		}
		if n > maxLen {
			t.Fatalf("piece of %d bytes, max %d", n, maxLen)
		}
		if _, err := tunnel.ValidateOffload(b[:n], po); err != nil {
			t.Fatalf("piece offload: %v", err)
		}
		pieces = append(pieces, piece{b[:n], po})
	}
	var want [][]byte
	buf := make([]byte, 0, 4*tunnel.BufSize)
	var at []int
	var offs []tunnel.Offload
	for _, i := range order {
		pc := pieces[i%len(pieces)]
		at = append(at, len(buf))
		offs = append(offs, pc.o)
		buf = append(buf, pc.p...)
		want = append(want, tuntest.Segments(t, pc.p, pc.o)...)
	}
	buf = buf[:cap(buf)]
	at = append(at, len(buf))
	var got [][]byte
	var co tunnel.Coalescer
	merged := 0
	for k := 0; k < len(order); {
		start, end := at[k], at[k+1]
		if k+1 == len(order) {
			end = at[k] + len(pieces[order[k]%len(pieces)].p)
		}
		k++
		o := offs[k-1]
		if co.Start(buf, start, end, o) {
			for k < len(order) {
				e := at[k+1]
				if k+1 == len(order) {
					e = at[k] + len(pieces[order[k]%len(pieces)].p)
				}
				if !co.Add(buf[at[k]:e], offs[k]) {
					break
				}
				k++
			}
			end, o, _ = co.Finish()
		}
		got = append(got, tuntest.Segments(t, buf[start:end], o)...)
		merged++
	}
	if len(got) != len(want) {
		t.Fatalf("%d segments after merging, want %d", len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("segment %d differs after merging", i)
		}
	}
	return merged
}

func TestCutAndMerge(t *testing.T) {
	v4s, v4d := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
	v6s, v6d := netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3")
	seq := func(n int) []int {
		o := make([]int, n)
		for i := range o {
			o[i] = i
		}
		return o
	}
	for _, tt := range []struct {
		name     string
		src, dst netip.Addr
		payload  int
		mss      int
		maxLen   int
		order    []int
		merged   int
	}{
		{"v4 all", v4s, v4d, 60000, 1404, 1456, seq(43), 1},
		{"v6 all", v6s, v6d, 60000, 1376, 1436, seq(44), 1},
		{"v4 three per piece", v4s, v4d, 60000, 1404, 4400, seq(15), 1},
		{"gap", v4s, v4d, 14040, 1404, 1456, []int{0, 1, 2, 4, 5, 6, 7, 8, 9}, 2},
		{"reordered", v4s, v4d, 14040, 1404, 1456, []int{0, 2, 1, 3, 4, 5, 6, 7, 8, 9}, 4},
		{"duplicate", v4s, v4d, 14040, 1404, 1456, []int{0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 2},
		{"tail first", v4s, v4d, 14040, 1404, 1456, []int{9, 0, 1, 2, 3, 4, 5, 6, 7, 8}, 2},
		{"short tail ends the run", v4s, v4d, 5000, 1404, 1456, []int{0, 1, 2, 3, 0, 1}, 2},
		{"multi-segment pieces with a gap", v4s, v4d, 60000, 1404, 4400, []int{0, 1, 3, 4, 5}, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pkt := tuntest.TCP(tt.src, tt.dst, tt.payload)
			ip := tuntest.IPHeaderLen(pkt)
			binary.BigEndian.PutUint32(pkt[ip+4:], 0xfffff000)
			if n := cutAndMerge(t, pkt, tuntest.TSO(pkt, tt.mss), tt.maxLen, tt.order); n != tt.merged {
				t.Errorf("%d packets after merging, want %d", n, tt.merged)
			}
		})
	}
}

// FuzzCutAndMerge cuts super-packets of any size and segment size into
// pieces, delivers any sequence of them (losses, reordering, duplicates)
// and merges: the result always carries exactly the delivered segments.
func FuzzCutAndMerge(f *testing.F) {
	f.Add(uint16(60000), uint16(1404), uint16(1456), false, []byte{0, 1, 2, 4, 5, 3, 3, 9})
	f.Add(uint16(3000), uint16(500), uint16(2000), true, []byte{1, 0, 2, 2, 5})
	f.Add(uint16(1), uint16(1), uint16(100), false, []byte{0})
	f.Fuzz(func(t *testing.T, payload, mss, maxLen uint16, v6 bool, order []byte) {
		src, dst := netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("100.64.2.3")
		hl := 40
		if v6 {
			src, dst, hl = netip.MustParseAddr("fd00:1::2"), netip.MustParseAddr("fd00:2::3"), 60
		}
		if payload == 0 || mss == 0 || int(payload)+hl > 65535 || int(maxLen) < hl+int(mss) || len(order) == 0 || len(order) > 64 {
			return
		}
		pkt := tuntest.TCP(src, dst, int(payload))
		idx := make([]int, len(order))
		for i, b := range order {
			idx[i] = int(b)
		}
		cutAndMerge(t, pkt, tuntest.TSO(pkt, int(mss)), int(maxLen), idx)
	})
}
