package tunnel

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/inet"
)

// TestCodel drives one queue's controller with a fake clock: each step is
// a read at a time (ms) that drained the queue or did not, and whether
// the batch carries a signal.
func TestCodel(t *testing.T) {
	const ms = int64(time.Millisecond)
	type read struct {
		at      float64 // ms
		drained bool
		signal  bool
	}
	// standing returns reads every ms from..to (inclusive) that never drain,
	// signalling at the given instants only.
	standing := func(from, to int, signals ...int) []read {
		var rs []read
		for at := from; at <= to; at++ {
			s := false
			for _, x := range signals {
				s = s || x == at
			}
			rs = append(rs, read{float64(at), false, s})
		}
		return rs
	}
	cat := func(parts ...[]read) []read {
		var rs []read
		for _, p := range parts {
			rs = append(rs, p...)
		}
		return rs
	}
	for _, tt := range []struct {
		name  string
		reads []read
	}{
		{"a queue drained at every read never signals", []read{
			{0, true, false}, {1, true, false}, {50, true, false}, {51, true, false}, {200, true, false},
		}},
		{"short standing queues do not signal", cat(
			[]read{{0, true, false}}, standing(1, 21), []read{{22, true, false}},
			standing(23, 43), []read{{44, true, false}},
		)},
		// Above target (2 ms) from 2 ms; a signal once that has lasted the
		// interval (20 ms); then every 20/√n ms: 42, 56.1, 67.7, 77.7.
		{"a standing queue signals at the control law's pace", cat(
			[]read{{0, true, false}}, standing(1, 80, 22, 42, 57, 68, 78),
		)},
		{"a drained read ends it; the next begins after target and interval again", cat(
			[]read{{0, true, false}}, standing(1, 30, 22), []read{{31, true, false}},
			standing(32, 60, 53),
		)},
		// Re-entering soon after a dropping state with more than one signal
		// resumes near its pace: count = signals of the last state.
		{"re-entry resumes the last pace", cat(
			[]read{{0, true, false}}, standing(1, 60, 22, 42, 57), []read{{61, true, false}},
			// a new state at 83 with count 3-1 = 2: the next after 20/√2 =
			// 14.1 ms (97.1), then 20/√3 (108.7)
			standing(62, 112, 83, 98, 109),
		)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCodel(AQMTarget, AQMInterval)
			base := int64(time.Hour)
			for _, r := range tt.reads {
				now := base + int64(r.at*float64(ms))
				if got := c.read(now, r.drained); got != r.signal {
					t.Fatalf("read at %v ms (drained %v): signal %v, want %v", r.at, r.drained, got, r.signal)
				}
			}
		})
	}
}

func TestMarkCE(t *testing.T) {
	v4 := func(tos byte) []byte {
		p := make([]byte, 40)
		p[0], p[1] = 0x45, tos
		binary.BigEndian.PutUint16(p[2:], 40)
		p[8], p[9] = 64, 6
		copy(p[12:], []byte{100, 64, 1, 2, 100, 64, 2, 3})
		binary.BigEndian.PutUint16(p[10:], inet.Checksum(p[:20], 0))
		return p
	}
	v6 := func(tc byte) []byte {
		p := make([]byte, 60)
		p[0], p[1] = 0x60|tc>>4, tc<<4
		binary.BigEndian.PutUint16(p[4:], 20)
		p[6], p[7] = 6, 64
		return p
	}
	for _, tt := range []struct {
		name   string
		pkt    []byte
		marked bool
		want   byte // the ECN bits after
	}{
		{"v4 not ECT", v4(0x00), false, 0},
		{"v4 ECT(0)", v4(0x02), true, 3},
		{"v4 ECT(1), DSCP kept", v4(0xb9), true, 3},
		{"v4 already CE", v4(0x03), false, 3},
		{"v6 not ECT", v6(0x00), false, 0},
		{"v6 ECT(0), DSCP kept", v6(0xba), true, 3},
		{"v6 already CE", v6(0x03), false, 3},
		{"not IP", []byte{0x10, 0x02, 0, 0}, false, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := append([]byte(nil), tt.pkt...)
			if got := markCE(tt.pkt); got != tt.marked {
				t.Fatalf("marked %v, want %v", got, tt.marked)
			}
			switch tt.pkt[0] >> 4 {
			case 4:
				if tt.pkt[1]&3 != tt.want || tt.pkt[1]&^3 != before[1]&^3 {
					t.Errorf("TOS %#x → %#x", before[1], tt.pkt[1])
				}
				if inet.Checksum(tt.pkt[:20], 0) != 0 {
					t.Error("IPv4 header checksum invalid after marking")
				}
			case 6:
				tc := tt.pkt[0]<<4 | tt.pkt[1]>>4
				if tc&3 != tt.want || tc&^3 != (before[0]<<4|before[1]>>4)&^3 {
					t.Errorf("traffic class %#x → %#x", before[0]<<4|before[1]>>4, tc)
				}
			}
			if !tt.marked && string(before) != string(tt.pkt) {
				t.Error("an unmarked packet was changed")
			}
		})
	}
}
