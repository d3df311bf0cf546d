// Command testpod is the one binary of the real-cluster tests' image
// (internal/kubecluster): a pod's HTTP server that probes other addresses
// on request, and, as "testpod pause", the sandbox's pause process.
//
//	testpod [serve] [--port 8080] [--also 9090,…] [--first-dial host:port]
//	                               serve HTTP on every address (on --port and
//	                               each --also port); with --first-dial, first
//	                               try one TCP connection (300 ms) and report
//	                               it at /first
//	testpod pause                  sleep until SIGTERM/SIGINT, reaping children
//
// Endpoints (all GET):
//
//	/                 this pod's hostname and addresses, as JSON
//	/probe?kind=K&target=T  reach T from this pod: K is tcp (connect to
//	                  host:port), http (GET http://T/ and read the answer)
//	                  or ping (an ICMP echo to an address); 200 with the
//	                  answer, 502 with the error
//	/stream?bytes=N&rate=R  N bytes of a fixed pattern, at R bytes/s (0: as
//	                  fast as possible)
//	/fetch?url=U      GET U and answer {"bytes":…,"sha256":…} of its body,
//	                  or 502 with how far it got
//	/first            what --first-dial found: "connected …" or "failed: …"
//	/udpwatch?target=T&interval=I&duration=D  send a numbered datagram to
//	                  T's UDP echo every I for D; answer {"sent","received",
//	                  "longestGapMs"}: the longest time without an echo
//
// UDP port 8081 echoes every datagram back to its sender.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "pause" {
		pause()
		return
	}
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("testpod", flag.ExitOnError)
	port := fs.Int("port", 8080, "HTTP port")
	also := fs.String("also", "", "more HTTP ports, comma-separated")
	firstDial := fs.String("first-dial", "", "host:port to connect to once, before serving (the pod's first packet)")
	fs.Parse(args)
	if *firstDial != "" {
		// Before anything else: the pod's very first packet.
		c, err := net.DialTimeout("tcp", *firstDial, 300*time.Millisecond)
		if err != nil {
			firstResult = "failed: " + err.Error()
		} else {
			firstResult = "connected " + c.LocalAddr().String() + " -> " + c.RemoteAddr().String()
			c.Close()
		}
	}
	mux := newMux()
	for _, p := range strings.Split(*also, ",") {
		if p == "" {
			continue
		}
		extra := &http.Server{Addr: ":" + p, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := extra.ListenAndServe(); err != nil {
				fmt.Fprintln(os.Stderr, "testpod:", err)
				os.Exit(1)
			}
		}()
	}
	srv := &http.Server{Addr: fmt.Sprintf(":%d", *port), Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := echo(*port + 1); err != nil {
		fmt.Fprintln(os.Stderr, "testpod:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "testpod:", err)
		os.Exit(1)
	}
}

func newMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/", whoami)
	mux.HandleFunc("/probe", probe)
	mux.HandleFunc("/stream", stream)
	mux.HandleFunc("/fetch", fetch)
	mux.HandleFunc("/udpwatch", udpWatch)
	mux.HandleFunc("/first", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, firstResult) })
	return mux
}

// firstResult is what --first-dial found (set before serving).
var firstResult = "no --first-dial"

// echo answers every datagram on port with itself.
func echo(port int) error {
	c, err := net.ListenPacket("udp", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			c.WriteTo(buf[:n], from)
		}
	}()
	return nil
}

// udpWatch measures how long a path goes without answers: a numbered
// datagram every interval, and the longest time between two echoes.
func udpWatch(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	interval, err1 := time.ParseDuration(q.Get("interval"))
	duration, err2 := time.ParseDuration(q.Get("duration"))
	if err1 != nil || err2 != nil || interval < time.Millisecond || duration > 10*time.Minute {
		http.Error(w, "interval (≥ 1ms) and duration (≤ 10m): durations", http.StatusBadRequest)
		return
	}
	c, err := net.Dial("udp", q.Get("target"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer c.Close()
	var received int
	var longest time.Duration
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := start
		buf := make([]byte, 64)
		for {
			c.SetReadDeadline(start.Add(duration + time.Second))
			_, err := c.Read(buf)
			if ne, ok := err.(net.Error); err != nil && !(ok && ne.Timeout()) {
				continue // an ICMP error (port unreachable): no answer, no end
			}
			if err != nil {
				end := start.Add(duration)
				if now := time.Now(); now.Before(end) {
					end = now
				}
				longest = max(longest, end.Sub(last))
				return
			}
			now := time.Now()
			longest = max(longest, now.Sub(last))
			last = now
			received++
		}
	}()
	sent := 0
	tick := time.NewTicker(interval)
	for time.Since(start) < duration {
		c.Write(fmt.Appendf(nil, "%d", sent))
		sent++
		<-tick.C
	}
	tick.Stop()
	<-done
	json.NewEncoder(w).Encode(map[string]any{"sent": sent, "received": received, "longestGapMs": longest.Milliseconds()})
}

// pause is what a sandbox's first process does: nothing, reaping any
// child that ends, until told to stop.
func pause() {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}

func whoami(w http.ResponseWriter, r *http.Request) {
	host, _ := os.Hostname()
	var addrs []string
	if as, err := net.InterfaceAddrs(); err == nil {
		for _, a := range as {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.IsGlobalUnicast() {
				addrs = append(addrs, ipn.IP.String())
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"hostname": host, "addrs": addrs, "from": r.RemoteAddr})
}

func probe(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	target := q.Get("target")
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	var answer string
	var err error
	switch q.Get("kind") {
	case "tcp":
		var c net.Conn
		if c, err = (&net.Dialer{}).DialContext(ctx, "tcp", target); err == nil {
			answer = "connected " + c.LocalAddr().String() + " -> " + c.RemoteAddr().String()
			c.Close()
		}
	case "http":
		answer, err = get(ctx, "http://"+target+"/")
	case "ping":
		answer, err = ping(ctx, target)
	default:
		http.Error(w, "kind: tcp, http or ping", http.StatusBadRequest)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	io.WriteString(w, answer)
}

func get(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("%s: %s", resp.Status, b)
	}
	return string(b), nil
}

// client opens a connection per request: each probe is a new connection
// (through a Service, a new choice of endpoint), never a kept-alive one.
var client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// ping sends one ICMP echo (a raw socket: containers have CAP_NET_RAW)
// and waits for its reply.
func ping(ctx context.Context, target string) (string, error) {
	ip := net.ParseIP(target)
	if ip == nil {
		return "", fmt.Errorf("ping: %q is not an address", target)
	}
	network, typ, proto := "ip4:icmp", icmp.Type(ipv4.ICMPTypeEcho), 1
	if ip.To4() == nil {
		network, typ, proto = "ip6:ipv6-icmp", ipv6.ICMPTypeEchoRequest, 58
	}
	c, err := icmp.ListenPacket(network, "")
	if err != nil {
		return "", fmt.Errorf("ping: %w", err)
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	id, seq := os.Getpid()&0xffff, int(time.Now().UnixNano()&0x7fff)
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("tulle")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := c.WriteTo(b, &net.IPAddr{IP: ip}); err != nil {
		return "", fmt.Errorf("ping %s: %w", ip, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return "", fmt.Errorf("ping %s: %w", ip, err)
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && (m.Type == ipv4.ICMPTypeEchoReply || m.Type == ipv6.ICMPTypeEchoReply) && e.Seq == seq {
			return fmt.Sprintf("reply from %s in %s", from, time.Since(start).Round(time.Microsecond)), nil
		}
	}
}

// pattern is byte i of every stream: the fetching side's checksum is
// predictable.
func pattern(i int64) byte { return byte(i % 251) }

func stream(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
	if err != nil || n < 0 {
		http.Error(w, "bytes: a count", http.StatusBadRequest)
		return
	}
	rate, _ := strconv.ParseInt(r.URL.Query().Get("rate"), 10, 64)
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	buf := make([]byte, 32<<10)
	start := time.Now()
	for off := int64(0); off < n; {
		k := min(int64(len(buf)), n-off)
		for i := range k {
			buf[i] = pattern(off + i)
		}
		if _, err := w.Write(buf[:k]); err != nil {
			return
		}
		off += k
		if rate > 0 {
			if ahead := time.Duration(off*int64(time.Second)/rate) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
	}
}

func fetch(w http.ResponseWriter, r *http.Request) {
	url := r.URL.Query().Get("url")
	resp, err := client.Get(url)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		http.Error(w, fmt.Sprintf("after %d bytes: %v", n, err), http.StatusBadGateway)
		return
	}
	json.NewEncoder(w).Encode(map[string]any{"bytes": n, "sha256": hex.EncodeToString(h.Sum(nil))})
}
