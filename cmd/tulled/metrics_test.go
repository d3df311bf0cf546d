package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
)

// httpGet fetches path from tulled's HTTP endpoint inside n's namespace
// (each namespace has its own 127.0.0.1:9107).
func httpGet(t *testing.T, n *cluster.Node, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return n.Dial(ctx, "127.0.0.1:9107")
	}}}
	resp, err := c.Get("http://tulled" + path)
	if err != nil {
		t.Fatalf("%s GET %s: %v", n.Name, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// httpGetOK is httpGet for polling: 0 while nothing answers yet.
func httpGetOK(n *cluster.Node, path string) (int, string) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return n.Dial(ctx, "127.0.0.1:9107")
	}}}
	resp, err := c.Get("http://tulled" + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// scrape parses n's /metrics with the Prometheus text parser.
func scrape(t *testing.T, n *cluster.Node) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, n, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	var p expfmt.TextParser
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// value is the metric of family name whose labels include want (name=value pairs).
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want ...string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range f.Metric {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(want); i += 2 {
			if labels[want[i]] != want[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("no %s with labels %v", name, want)
	return 0
}

// TestMetrics: /metrics parses, the byte counters move by a known transfer
// (within the TCP/IP headers' share), a spoofed packet moves the drop
// counter, and /healthz and /readyz answer as they should.
func TestMetrics(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{Args: []string{"--http-addr", "127.0.0.1:9107"}})
	a, b := c.Nodes[0], c.Nodes[1]
	for _, n := range c.Nodes {
		if code, _ := httpGet(t, n, "/healthz"); code != http.StatusOK {
			t.Errorf("%s /healthz: %d", n.Name, code)
		}
		if code, body := httpGet(t, n, "/readyz"); code != http.StatusOK {
			t.Errorf("%s /readyz: %d %s", n.Name, code, body)
		}
	}
	before := scrape(t, a)
	tx0 := value(t, before, "tulle_datapath_bytes_total", "direction", "tx")
	const size = 50 << 20
	sent, got := transfer(t, a, b, addr(t, b, false), size, 0)
	if sent != got {
		t.Fatal("transfer corrupted")
	}
	after := scrape(t, a)
	tx := value(t, after, "tulle_datapath_bytes_total", "direction", "tx") - tx0
	if r := tx / size; r < 1.0 || r > 1.1 {
		t.Errorf("tx bytes moved %.0f for a %d-byte transfer (%.3f×; want 1.00–1.10: payload plus headers)", tx, size, r)
	}
	if v := value(t, after, "tulle_backend_bytes_total", "backend", "udp", "direction", "tx"); v < size {
		t.Errorf("udp backend tx bytes %.0f < %d", v, size)
	}
	for _, m := range []string{"tulle_build_info", "tulle_ready", "tulle_peers", "tulle_lease_expiry_timestamp_seconds", "tulle_mtu_bytes", "tulle_datapath_batch_frames", "tulle_backend_datagrams_total"} {
		value(t, after, m)
	}
	if v := value(t, after, "tulle_ready"); v != 1 {
		t.Errorf("tulle_ready = %v", v)
	}
	if v := value(t, after, "tulle_peers", "backend", "udp"); v != 1 {
		t.Errorf("tulle_peers{udp} = %v", v)
	}
	// A spoofed inner source from a (a source in no subnet of a's) reaches
	// b's drop counter.
	spoofed0 := value(t, scrape(t, b), "tulle_drops_total", "component", "datapath", "reason", "spoofed")
	pkt := ipv4Packet(netip.MustParseAddr("100.111.255.1"), addr(t, b, false), 17, 32)
	if err := a.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: addr(t, b, false).As4()})
	}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); value(t, scrape(t, b), "tulle_drops_total", "component", "datapath", "reason", "spoofed") < spoofed0+1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the spoofed packet was not counted")
		}
	}
	// Not ready while the underlay address is gone; ready again after.
	if _, err := b.Run("ip", "addr", "del", b.IP4.String()+"/24", "dev", b.Link); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if code, body := httpGet(t, b, "/readyz"); code == http.StatusServiceUnavailable && strings.Contains(body, b.IP4.String()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz stayed 200 without the underlay address")
		}
	}
	if v := value(t, scrape(t, b), "tulle_ready"); v != 0 {
		t.Errorf("tulle_ready = %v while not ready", v)
	}
	if code, _ := httpGet(t, b, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz %d while only not ready", code)
	}
	if _, err := b.Run("ip", "addr", "add", b.IP4.String()+"/24", "dev", b.Link); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if code, _ := httpGet(t, b, "/readyz"); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz not 200 again after the address came back")
		}
	}
}

// TestStatusTable: `tullectl status` prints a row per peer with the
// traffic columns on a 3-node cluster; `-o json` parses into the status
// document.
func TestStatusTable(t *testing.T) {
	c := startCluster(t, 3, cluster.Options{})
	a := c.Nodes[0]
	ping(t, a, addr(t, c.Nodes[1], false))
	ctl := filepath.Join(filepath.Dir(tulled(t)), "tullectl")
	if out, err := exec.Command("go", "build", "-o", ctl, "../tullectl").CombinedOutput(); err != nil {
		t.Fatalf("build tullectl: %v: %s", err, out)
	}
	out, err := exec.Command(ctl, "status", "--run-dir", a.RunDir).CombinedOutput()
	if err != nil {
		t.Fatalf("tullectl status: %v: %s", err, out)
	}
	table := string(out)
	for _, want := range []string{"PEER", "BACKEND", "TX FRAMES", "TX BYTES", "RX FRAMES", "RX BYTES", "DROPS", "LAST SEEN", c.Nodes[1].Name, c.Nodes[2].Name, "udp", "version"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	var row []string
	for _, l := range strings.Split(table, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == c.Nodes[1].Name {
			row = f
		}
	}
	// PEER BACKEND ENDPOINT SUBNETS TX-FRAMES TX-BYTES RX-FRAMES RX-BYTES …
	if len(row) < 8 || row[4] == "0" || row[6] == "0" {
		t.Errorf("peer row %q: want frames both ways after a ping", row)
	}
	js, err := exec.Command(ctl, "status", "--run-dir", a.RunDir, "-o", "json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var s api.Status
	if err := json.Unmarshal(js, &s); err != nil {
		t.Fatalf("-o json: %v", err)
	}
	if s.Node != a.Name || len(s.Peers) != 2 || s.Version == "" {
		t.Errorf("-o json: %+v", s)
	}
	for _, p := range s.Peers {
		if p.Name == c.Nodes[1].Name && (p.Traffic == nil || p.Traffic.TxFrames == 0 || p.Traffic.RxFrames == 0 || p.Traffic.LastSeen.IsZero()) {
			t.Errorf("peer %s traffic %+v", p.Name, p.Traffic)
		}
	}
}
