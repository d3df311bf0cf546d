package pool

import (
	"sync"
	"testing"
)

func TestPool(t *testing.T) {
	made := 0
	p := New(2, func() *int { made++; v := made; return &v })
	a, b, c := p.Get(), p.Get(), p.Get()
	if made != 3 {
		t.Fatalf("made %d objects for 3 gets on an empty pool, want 3", made)
	}
	p.Put(a)
	p.Put(b)
	p.Put(c) // beyond capacity: dropped
	if got := p.Get(); got != a {
		t.Errorf("first Get after Put returned %d, want the first returned object %d", *got, *a)
	}
	if got := p.Get(); got != b {
		t.Errorf("second Get returned %d, want %d", *got, *b)
	}
	if p.Get(); made != 4 {
		t.Errorf("the object beyond capacity was kept: made %d, want 4", made)
	}
}

func TestPoolConcurrent(t *testing.T) {
	var mu sync.Mutex
	inUse := map[*int]bool{}
	p := New(4, func() *int { return new(int) })
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				v := p.Get()
				mu.Lock()
				if inUse[v] {
					t.Error("one object handed to two callers at once")
				}
				inUse[v] = true
				mu.Unlock()
				*v++
				mu.Lock()
				delete(inUse, v)
				mu.Unlock()
				p.Put(v)
			}
		})
	}
	wg.Wait()
}
