package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	os.WriteFile(good, []byte(`{"Network":"100.96.0.0/12"}`), 0o644)
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"Network":"100.96.0.0/12","SubnetMin":"10.0.0.0"}`), 0o644)
	tests := []struct {
		name string
		args []string
		want string // substring of the error; "" for success
	}{
		{"defaults", []string{"--net-conf", good, "--node-name", "n1"}, ""},
		{"public ips", []string{"--net-conf", good, "--public-ip", "198.18.0.1", "--public-ipv6", "fd00:198::1"}, ""},
		{"missing net-conf", []string{"--net-conf", filepath.Join(dir, "nope.json")}, "read net-conf"},
		{"bad net-conf field", []string{"--net-conf", bad}, "SubnetMin"},
		{"v6 as public-ip", []string{"--net-conf", good, "--public-ip", "fd00::1"}, "--public-ip"},
		{"v4 as public-ipv6", []string{"--net-conf", good, "--public-ipv6", "198.18.0.1"}, "--public-ipv6"},
		{"long tun name", []string{"--net-conf", good, "--tun", "abcdefghijklmnop"}, "--tun"},
		{"slash in node", []string{"--net-conf", good, "--node-name", "a/b"}, "--node-name"},
		{"short ttl", []string{"--net-conf", good, "--lease-ttl", "1s"}, "--lease-ttl"},
		{"log level", []string{"--net-conf", good, "--log-level", "loud"}, "--log-level"},
		{"unknown flag", []string{"--net-conf", good, "--frobnicate"}, "frobnicate"},
		{"stray argument", []string{"--net-conf", good, "extra"}, "extra"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, io.Discard)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("parseFlags(%v) = %v", tt.args, err)
				}
				if o.net == nil {
					t.Fatal("no net config")
				}
				return
			}
			var ce *configError
			if !errors.As(err, &ce) {
				t.Fatalf("parseFlags(%v) = %v, want a configError mentioning %q", tt.args, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q: want one line mentioning %q", err, tt.want)
			}
		})
	}
}
