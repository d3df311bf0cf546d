package bench

import (
	"encoding/json"
	"errors"
	"maps"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"
)

// Schema names the results.json format; it changes only when a field's
// meaning does (fields may be added within a version).
const Schema = "tulle-bench/1"

// Results is results.json.
type Results struct {
	Schema   string       `json:"schema"`
	Started  time.Time    `json:"started"`
	Seconds  float64      `json:"seconds"`
	Host     Host         `json:"host"`
	Config   Config       `json:"config"`
	Figures  []FigureInfo `json:"figures"`
	Paths    []PathResult `json:"paths"`
	Complete bool         `json:"complete"`
}

// Host describes the machine the run was on.
type Host struct {
	CPUs      int    `json:"cpus"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"goVersion"`
}

// Config is what was run.
type Config struct {
	Nodes           int      `json:"nodes"`
	Paths           []string `json:"paths"`
	Rounds          int      `json:"rounds"`
	DurationSeconds float64  `json:"durationSeconds"`
	Streams         int      `json:"streams"`
	MTU             int      `json:"mtu"`
	NetemDelayMS    float64  `json:"netemDelayMs"`
	NetemLossPct    float64  `json:"netemLossPct"`
	Wire            bool     `json:"wire"`
	LossPct         float64  `json:"lossPct"`
	TulledArgs      []string `json:"tulledArgs,omitempty"`
	AllToAll        bool     `json:"allToAll,omitempty"`
	RTTSamples      int      `json:"rttSamples"`
}

// PathResult holds one path's figures.
type PathResult struct {
	Name string `json:"name"`
	// InnerMTU is the largest packet the path carries unfragmented
	// between the nodes' addresses it is measured on.
	InnerMTU int             `json:"innerMtu,omitempty"`
	Figures  map[string]Stat `json:"figures"`
	// Ratios of each figure to the same figure of the reference paths,
	// computed per round and then summarised.
	VsKernelVXLAN map[string]Stat `json:"vsKernelVxlan,omitempty"`
	VsRaw         map[string]Stat `json:"vsRaw,omitempty"`
	// VsWireGuardGo: ratios to the stock wireguard-go, when it ran.
	VsWireGuardGo map[string]Stat `json:"vsWireguardGo,omitempty"`
}

// Stat summarises one figure's samples (one per round).
type Stat struct {
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
}

func newStat(v []float64) Stat {
	return Stat{Median: median(v), Min: slices.Min(v), Max: slices.Max(v), Samples: v}
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Summarize turns samples into per-path statistics and per-round ratios.
// Paths keep the order of the paths argument.
func Summarize(samples []Sample, paths []string) ([]PathResult, error) {
	if len(samples) == 0 {
		return nil, errors.New("no samples")
	}
	type key struct{ path, fig string }
	vals := map[key][]float64{}
	byRound := map[key]map[int]float64{}
	for _, s := range samples {
		k := key{s.Path, s.Figure}
		vals[k] = append(vals[k], s.Value)
		if byRound[k] == nil {
			byRound[k] = map[int]float64{}
		}
		byRound[k][s.Round] = s.Value
	}
	// Ratio samples stay in round order, like the figures' samples, so a
	// reader can pair them.
	ratios := func(path, fig, ref string) (Stat, bool) {
		mine := byRound[key{path, fig}]
		rounds := slices.Sorted(maps.Keys(mine))
		var r []float64
		for _, round := range rounds {
			if x, ok := byRound[key{ref, fig}][round]; ok && x != 0 {
				r = append(r, mine[round]/x)
			}
		}
		if len(r) == 0 {
			return Stat{}, false
		}
		return newStat(r), true
	}
	var out []PathResult
	for _, p := range paths {
		pr := PathResult{Name: p, Figures: map[string]Stat{}}
		for k, v := range vals {
			if k.path != p {
				continue
			}
			pr.Figures[k.fig] = newStat(v)
			for _, ref := range []struct {
				name string
				dst  *map[string]Stat
			}{{PathKernelVXLAN, &pr.VsKernelVXLAN}, {PathRaw, &pr.VsRaw}, {PathWireGuardGo, &pr.VsWireGuardGo}} {
				if st, ok := ratios(p, k.fig, ref.name); ok {
					if *ref.dst == nil {
						*ref.dst = map[string]Stat{}
					}
					(*ref.dst)[k.fig] = st
				}
			}
		}
		out = append(out, pr)
	}
	return out, nil
}

// hostInfo describes this machine.
func hostInfo() Host {
	h := Host{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(b))
	}
	return h
}

// WriteJSON writes results.json.
func (r *Results) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
