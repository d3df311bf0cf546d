package tunnel

import (
	"encoding/binary"
	"testing"
)

func TestFlowHash(t *testing.T) {
	v4 := func(sport uint16, fragOff uint16, mf bool) []byte {
		p := make([]byte, 60)
		p[0], p[9] = 0x45, 6
		copy(p[12:], []byte{100, 96, 1, 7, 100, 96, 2, 9})
		if mf {
			fragOff |= 0x2000
		}
		binary.BigEndian.PutUint16(p[6:], fragOff)
		binary.BigEndian.PutUint16(p[20:], sport)
		binary.BigEndian.PutUint16(p[22:], 5201)
		return p
	}
	v6 := func(sport uint16) []byte {
		p := make([]byte, 80)
		p[0], p[6] = 0x60, 17
		p[8], p[24] = 0xfd, 0xfd
		binary.BigEndian.PutUint16(p[40:], sport)
		return p
	}
	if flowHash(v4(40000, 0, false)) != flowHash(v4(40000, 0, false)) {
		t.Fatal("one flow, two hashes")
	}
	if flowHash(v4(40000, 0, false)) == flowHash(v4(40001, 0, false)) {
		t.Error("ports do not enter the hash")
	}
	if flowHash(v6(40000)) == flowHash(v6(40001)) {
		t.Error("IPv6 ports do not enter the hash")
	}
	// A fragmented datagram's pieces, first and later, stay together.
	if flowHash(v4(40000, 0, true)) != flowHash(v4(1234, 185, false)) {
		t.Error("fragments of one datagram hash apart")
	}
	for _, p := range [][]byte{nil, {0x45}, make([]byte, 19), {0x60, 0, 0, 0}} {
		flowHash(p) // short or not IP: no panic
	}
	// Spread: 64 flows fill all 4 queues.
	used := map[uint32]bool{}
	for i := range 64 {
		used[flowHash(v4(uint16(40000+i), 0, false))%4] = true
	}
	if len(used) != 4 {
		t.Errorf("64 flows used %d of 4 queues", len(used))
	}
}
