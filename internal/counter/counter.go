// Package counter is a fixed set of named, atomically updated counters: the
// per-reason counts the packet path keeps instead of logging. Each owner
// (the datapath, each backend) declares its own keys and names; the status
// API merges their snapshots.
package counter

import "sync/atomic"

// Max is how many counters one Set holds.
const Max = 32

// Set counts by key K (a small integer enum below Max). The zero value is
// ready; Add is one atomic add, with no allocation and no lock.
type Set[K ~int] struct {
	c [Max]atomic.Uint64
}

// Add adds n to counter k.
func (s *Set[K]) Add(k K, n uint64) { s.c[k].Add(n) }

// Get returns counter k.
func (s *Set[K]) Get(k K) uint64 { return s.c[k].Load() }

// SnapshotInto stores every counter under its name (names[k] for key k).
func (s *Set[K]) SnapshotInto(names []string, into map[string]uint64) {
	for k, name := range names {
		into[name] = s.c[k].Load()
	}
}
