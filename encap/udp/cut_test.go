package udp

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/encap/internal/udpsock/udpsocktest"
	"github.com/tulle-net/tulle/internal/inet"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

func sameSegments(t *testing.T, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d segments, want %d", len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("segment %d differs", i)
		}
	}
}

// cutLayout runs the sender's layout of a super-packet cut along its
// segments and returns the datagrams it would put on the wire.
func cutLayout(t *testing.T, pkt []byte, o tunnel.Offload, maxDg int) [][]byte {
	t.Helper()
	s := newSender(testTransport())
	cut, err := tunnel.NewCutter(pkt, o, maxDg-Overhead)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.pieces(&udpsock.Socket{}, nil, &cut, 0); err != nil {
		t.Fatal(err)
	}
	return s.b.Queued()
}

// TestCutSurvivesLoss delivers the datagrams of a cut super-packet with
// losses, reordering and duplicates, one per message and in GRO messages:
// whatever arrives reaches the TUN, as few writes as contiguous runs, with
// exactly the segments of the datagrams that arrived, in arrival order.
func TestCutSurvivesLoss(t *testing.T) {
	src := netip.MustParseAddrPort("198.18.0.2:8285")
	for _, fam := range []struct {
		name     string
		src, dst netip.Addr
		maxDg    int
		mss      int
	}{
		{"v4", netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 1472, 1404},
		{"v6", netip.MustParseAddr("fd00:96:2::1"), netip.MustParseAddr("fd00:96:1::1"), 1452, 1376},
		{"v4 jumbo", netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("100.96.1.1"), 8972, 1404},
	} {
		pkt := tuntest.TCP(fam.src, fam.dst, 60000)
		ip := tuntest.IPHeaderLen(pkt)
		binary.BigEndian.PutUint32(pkt[ip+4:], 0xffff8000) // sequence numbers wrap
		o := tuntest.TSO(pkt, fam.mss)
		dgs := cutLayout(t, pkt, o, fam.maxDg)
		wire := tuntest.Segments(t, pkt, o)
		per := (len(wire) + len(dgs) - 1) / len(dgs) // segments per datagram
		all := make([]int, len(dgs))
		for i := range all {
			all[i] = i
		}
		last := len(dgs) - 1
		cases := []struct {
			name   string
			order  []int
			frames int // TUN writes
		}{
			{"all", all, 1},
			{"lost middle", append(append([]int{}, all[:3]...), all[4:]...), 2},
			{"lost first", all[1:], 1},
			{"lost last", all[:last], 1},
			{"every other lost", everyOther(len(dgs)), (len(dgs) + 1) / 2},
			{"swapped", append([]int{0, 2, 1}, all[3:]...), 4},
			{"duplicates", append([]int{0, 1, 2}, all...), 2},
			{"only the tail", []int{last}, 1},
		}
		for _, tc := range cases {
			for _, gro := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/%s/gro=%v", fam.name, tc.name, gro), func(t *testing.T) {
					if len(dgs) < 5 {
						t.Fatalf("%d datagrams: too few for the cases", len(dgs))
					}
					var msgs []udpsocktest.Msg
					var want [][]byte
					for _, i := range tc.order {
						d := dgs[i]
						if m := len(msgs) - 1; gro && m >= 0 && len(msgs[m].Data)%len(dgs[0]) == 0 && len(msgs[m].Data)+len(d) <= 65535 {
							m := &msgs[len(msgs)-1]
							m.Data = append(m.Data, d...)
						} else {
							msgs = append(msgs, udpsocktest.Msg{Data: append([]byte(nil), d...), GSO: len(dgs[0]), Src: src})
						}
						want = append(want, wire[i*per:min((i+1)*per, len(wire))]...)
					}
					tr := testTransport()
					pkts, frames := drain(newReceiver(tr, (&udpsocktest.Reader{Msgs: msgs}).Read, true, false), 8)
					var got [][]byte
					for i, f := range frames {
						if _, err := tunnel.ValidateOffload(pkts[i], f.Offload); err != nil {
							t.Fatalf("frame %d: %v", i, err)
						}
						partialSumOK(t, pkts[i])
						got = append(got, tuntest.Segments(t, pkts[i], f.Offload)...)
					}
					sameSegments(t, got, want)
					// A run also ends with a recvmmsg batch, or where a
					// GRO message leaves no room behind it.
					most := tc.frames + (len(msgs)-1)/recvBatch
					if gro {
						most = tc.frames + len(msgs) - 1
					}
					if len(frames) < tc.frames || len(frames) > most {
						t.Errorf("%d TUN writes, want %d to %d", len(frames), tc.frames, most)
					}
				})
			}
		}
	}
}

func everyOther(n int) []int {
	var o []int
	for i := 0; i < n; i += 2 {
		o = append(o, i)
	}
	return o
}

// partialSumOK checks that a TCP packet's checksum field holds its
// pseudo-header sum, as the kernel expects of a partial checksum.
func partialSumOK(t *testing.T, p []byte) {
	t.Helper()
	ip := tuntest.IPHeaderLen(p)
	var src, dst []byte
	if ip == 20 {
		src, dst = p[12:16], p[16:20]
		if inet.Checksum(p[:20], 0) != 0 {
			t.Fatal("IPv4 header checksum invalid")
		}
	} else {
		src, dst = p[8:24], p[24:40]
	}
	if got, want := binary.BigEndian.Uint16(p[ip+16:]), inet.Fold(inet.PseudoHeader(src, dst, 6, len(p)-ip)); got != want {
		t.Fatalf("checksum field %#04x, want the pseudo-header sum %#04x", got, want)
	}
}
