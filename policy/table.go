package policy

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"sigs.k8s.io/knftables"
)

// TableName is the nftables table policy owns (family inet).
const TableName = "tulle-policy"

// Table applies Rulesets to the nftables table: the first time (and after
// any failure) by rebuilding it whole in one transaction, then by changing
// only what differs. Either way one transaction: the kernel never holds a
// half-applied state, and a restart never opens a window of allow-all.
type Table struct {
	nft knftables.Interface
	// last is what the kernel holds (nil: unknown; rebuild).
	last *Ruleset
}

// NewTable returns a Table on nft, which must be for TableName (family
// inet).
func NewTable(nft knftables.Interface) *Table { return &Table{nft: nft} }

// baseChains are the chains on the forward hook. Egress first: a drop is
// final, an accept in one base chain leaves the packet to the next, so a
// packet between two local pods meets the sender's egress and then the
// receiver's ingress.
var baseChains = map[string]knftables.BaseChainPriority{
	chainEgress:  "filter - 2",
	chainIngress: "filter - 1",
}

func chainObj(name string) *knftables.Chain {
	c := &knftables.Chain{Name: name}
	if prio, ok := baseChains[name]; ok {
		c.Type = knftables.PtrTo(knftables.FilterType)
		c.Hook = knftables.PtrTo(knftables.ForwardHook)
		c.Priority = knftables.PtrTo(prio)
	}
	return c
}

func setObj(name string, s *Set) knftables.Object {
	if s.Map {
		key, val, _ := cutType(s.Type)
		return &knftables.Map{Name: name, Type: key + " : " + val, Flags: s.Flags, Comment: knftables.PtrTo(s.Comment)}
	}
	return &knftables.Set{Name: name, Type: s.Type, Flags: s.Flags, Comment: knftables.PtrTo(s.Comment)}
}

func cutType(t string) (key, val string, ok bool) {
	for i := 0; i+3 <= len(t); i++ {
		if t[i:i+3] == " : " {
			return t[:i], t[i+3:], true
		}
	}
	return t, "", false
}

func elemObj(set string, s *Set, key, val string) *knftables.Element {
	e := &knftables.Element{Key: []string{key}}
	if s.Map {
		e.Map = set
		e.Value = []string{val}
	} else {
		e.Set = set
	}
	return e
}

// Apply makes the table hold rs.
func (t *Table) Apply(ctx context.Context, rs *Ruleset) error {
	tx := t.nft.NewTransaction()
	if t.last == nil {
		rebuild(tx, rs)
	} else {
		diff(tx, t.last, rs)
	}
	if tx.NumOperations() == 0 {
		return nil
	}
	if err := t.nft.Run(ctx, tx); err != nil {
		t.last = nil
		return fmt.Errorf("nftables table %s: %w", TableName, err)
	}
	t.last = rs
	return nil
}

// Forget makes the next Apply rebuild the table (after a check found it
// changed behind tulled's back).
func (t *Table) Forget() { t.last = nil }

// rebuild writes rs into tx from nothing: the table is deleted and made
// anew inside the transaction, so the kernel goes from the old table to
// the new one at once (kernel and knftables' fake agree on deletion,
// unlike on what flushing a table keeps).
func rebuild(tx *knftables.Transaction, rs *Ruleset) {
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("tulle: Kubernetes NetworkPolicy")})
	diff(tx, &Ruleset{}, rs)
}

// diff writes into tx what turns the table from old into rs, in an order
// the kernel accepts: objects before what refers to them, references gone
// before what they referred to.
func diff(tx *knftables.Transaction, old, rs *Ruleset) {
	setNames := slices.Sorted(maps.Keys(rs.Sets))
	chainNames := slices.Sorted(maps.Keys(rs.Chains))
	for _, n := range slices.Sorted(maps.Keys(rs.Counters)) {
		if _, ok := old.Counters[n]; !ok {
			tx.Add(&knftables.Counter{Name: n, Comment: knftables.PtrTo(rs.Counters[n])})
		}
	}
	for _, n := range setNames {
		if old.Sets[n] == nil {
			tx.Add(setObj(n, rs.Sets[n]))
		}
	}
	for _, n := range chainNames {
		if _, ok := old.Chains[n]; !ok {
			tx.Add(chainObj(n))
		}
	}
	for _, n := range chainNames {
		prev, had := old.Chains[n]
		if had && slices.Equal(prev, rs.Chains[n]) {
			continue
		}
		if had {
			tx.Flush(chainObj(n))
		}
		for _, r := range rs.Chains[n] {
			tx.Add(&knftables.Rule{Chain: n, Rule: r})
		}
	}
	for _, n := range setNames {
		s := rs.Sets[n]
		var prev map[string]string
		if o := old.Sets[n]; o != nil {
			prev = o.Elems
		}
		for _, k := range slices.Sorted(maps.Keys(prev)) {
			if v, ok := s.Elems[k]; !ok || v != prev[k] {
				tx.Delete(elemObj(n, s, k, prev[k]))
			}
		}
		for _, k := range slices.Sorted(maps.Keys(s.Elems)) {
			if v, ok := prev[k]; !ok || v != s.Elems[k] {
				tx.Add(elemObj(n, s, k, s.Elems[k]))
			}
		}
	}
	for _, n := range slices.Sorted(maps.Keys(old.Chains)) {
		if _, ok := rs.Chains[n]; !ok {
			tx.Flush(chainObj(n))
			tx.Delete(chainObj(n))
		}
	}
	for _, n := range slices.Sorted(maps.Keys(old.Sets)) {
		if rs.Sets[n] == nil {
			tx.Delete(setObj(n, old.Sets[n]))
		}
	}
	for _, n := range slices.Sorted(maps.Keys(old.Counters)) {
		if _, ok := rs.Counters[n]; !ok {
			tx.Delete(&knftables.Counter{Name: n})
		}
	}
}

// Check reports whether the kernel's table still has every chain and set
// of the last Apply (something may have flushed or deleted it).
func (t *Table) Check(ctx context.Context) error {
	if t.last == nil {
		return nil
	}
	for _, kind := range []string{"chains", "sets", "maps", "counters"} {
		names, err := t.nft.List(ctx, kind)
		if err != nil {
			return fmt.Errorf("list %s of table %s: %w", kind, TableName, err)
		}
		if kind == "counters" {
			have := map[string]bool{}
			for _, n := range names {
				have[n] = true
			}
			for n := range t.last.Counters {
				if !have[n] {
					return fmt.Errorf("table %s lost counter %s", TableName, n)
				}
			}
			continue
		}
		have := map[string]bool{}
		for _, n := range names {
			have[n] = true
		}
		for n, s := range t.last.Sets {
			if (kind == "maps") == s.Map && kind != "chains" && !have[n] {
				return fmt.Errorf("table %s lost %s %s", TableName, kind, n)
			}
		}
		if kind == "chains" {
			for n := range t.last.Chains {
				if !have[n] {
					return fmt.Errorf("table %s lost chain %s", TableName, n)
				}
			}
		}
	}
	return nil
}

// Drops are the packets the table dropped: by reason ("ingress",
// "egress": denied by policy; "unattached": a local address no pod
// holds), and by policy ("<namespace>/<name> <direction>", counting each
// drop once per policy isolating the pod).
type Drops struct {
	ByReason map[string]uint64
	ByPolicy map[string]uint64
}

// Dropped reads the table's counters (since it was last rebuilt).
func (t *Table) Dropped(ctx context.Context) (Drops, error) {
	d := Drops{ByReason: map[string]uint64{}, ByPolicy: map[string]uint64{}}
	ctrs, err := t.nft.ListCounters(ctx)
	if err != nil {
		return d, fmt.Errorf("list counters of table %s: %w", TableName, err)
	}
	reasons := map[string]string{}
	for r, c := range DropChains {
		reasons[c] = r
	}
	for _, c := range ctrs {
		var n uint64
		if c.Packets != nil {
			n = *c.Packets
		}
		switch {
		case reasons[c.Name] != "":
			d.ByReason[reasons[c.Name]] += n
		case strings.HasPrefix(c.Name, PolicyCounterPrefix) && c.Comment != nil:
			d.ByPolicy[*c.Comment] += n
		}
	}
	return d, nil
}

// Cleanup deletes the table (tulled cleanup): every pod is unpoliced
// after it. No table, or no nft, is nothing to remove.
func Cleanup(ctx context.Context) error {
	nft, err := knftables.New(knftables.InetFamily, TableName)
	if err != nil {
		return nil // no nftables: nothing of ours can be there
	}
	tx := nft.NewTransaction()
	tx.Delete(&knftables.Table{})
	if err := nft.Run(ctx, tx); err != nil && !knftables.IsNotFound(err) {
		return fmt.Errorf("delete nftables table %s: %w", TableName, err)
	}
	return nil
}
