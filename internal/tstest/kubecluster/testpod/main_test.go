package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

func fetchURL(t *testing.T, base, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(base + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestServer: whoami, probes, and a stream fetched through /fetch with the
// checksum the real-cluster test predicts.
func TestServer(t *testing.T) {
	srv := httptest.NewServer(newMux())
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	code, body := fetchURL(t, srv.URL, "/")
	var who struct{ Hostname, From string }
	if code != 200 || json.Unmarshal([]byte(body), &who) != nil || who.Hostname == "" || !strings.HasPrefix(who.From, "127.0.0.1:") {
		t.Errorf("/: %d %q", code, body)
	}
	for _, tc := range []struct {
		query string
		code  int
	}{
		{"kind=tcp&target=" + host, 200},
		{"kind=http&target=" + host, 200},
		{"kind=tcp&target=127.0.0.1:1", 502},
		{"kind=ping&target=not-an-ip", 502},
		{"kind=udp&target=" + host, 400},
	} {
		if code, body := fetchURL(t, srv.URL, "/probe?"+tc.query); code != tc.code {
			t.Errorf("/probe?%s: %d %q, want %d", tc.query, code, body, tc.code)
		}
	}

	const n = 1<<20 + 17
	want := make([]byte, n)
	for i := range want {
		want[i] = byte(i % 251)
	}
	sum := sha256.Sum256(want)
	code, body = fetchURL(t, srv.URL, "/fetch?url="+url.QueryEscape(srv.URL+"/stream?bytes=1048593&rate=0"))
	var res struct {
		Bytes  int64
		SHA256 string
	}
	if code != 200 || json.Unmarshal([]byte(body), &res) != nil || res.Bytes != n || res.SHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("/fetch of a stream: %d %q, want %d bytes %x", code, body, n, sum)
	}
	if code, _ := fetchURL(t, srv.URL, "/stream?bytes=-1"); code != 400 {
		t.Errorf("/stream?bytes=-1: %d, want 400", code)
	}
}

// TestUDPWatch: against a live echo every datagram comes back and the
// longest gap is about the interval; against nothing, the gap is the
// whole duration.
func TestUDPWatch(t *testing.T) {
	srv := httptest.NewServer(newMux())
	defer srv.Close()
	if err := echo(18081); err != nil {
		t.Fatal(err)
	}
	var res struct{ Sent, Received, LongestGapMs int }
	code, body := fetchURL(t, srv.URL, "/udpwatch?target=127.0.0.1:18081&interval=5ms&duration=300ms")
	if code != 200 || json.Unmarshal([]byte(body), &res) != nil || res.Sent < 30 || res.Received != res.Sent || res.LongestGapMs > 150 {
		t.Errorf("live echo: %d %q", code, body)
	}
	code, body = fetchURL(t, srv.URL, "/udpwatch?target=127.0.0.1:18082&interval=5ms&duration=300ms")
	if code != 200 || json.Unmarshal([]byte(body), &res) != nil || res.Received != 0 || res.LongestGapMs < 290 {
		t.Errorf("no echo: %d %q", code, body)
	}
	if code, _ := fetchURL(t, srv.URL, "/udpwatch?target=127.0.0.1:18081&interval=0s&duration=1s"); code != 400 {
		t.Errorf("interval 0: %d, want 400", code)
	}
}
