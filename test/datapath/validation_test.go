package datapath_test

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

const validateArg = "meshlane-validate"

// validation is what a mesh's redirect check found.
type validation struct {
	OK      bool   `json:"ok"`
	Err     string `json:"err,omitempty"`
	OrigDst string `json:"origDst,omitempty"`
}

// runValidation re-implements, from their documented behaviour, the checks
// the meshes run before the app starts when a CNI plugin does the redirect:
//
//	istio    (istio-validation, as the proxy user): listen on the redirect
//	         targets 127.0.0.1:15001 and :15006, dial 127.0.0.6:15002 from
//	         127.0.0.1; the connection must land on a listener, which reads
//	         its original destination.
//	linkerd  ADDR (linkerd-network-validator, as nobody): listen on the
//	         outbound port 4140, dial ADDR (any outside address); the
//	         connection must land on the listener, proven by a random token.
func runValidation(args []string) {
	var v validation
	defer func() { json.NewEncoder(os.Stdout).Encode(v) }()
	fail := func(err error) { v.Err = err.Error() }

	switch args[0] {
	case "istio":
		orig := make(chan string, 1)
		for _, a := range []string{"127.0.0.1:15001", "127.0.0.1:15006"} {
			l, err := net.Listen("tcp", a)
			if err != nil {
				fail(err)
				return
			}
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				o, err := origDst(c.(*net.TCPConn))
				if err != nil {
					o = "error: " + err.Error()
				}
				orig <- o
				c.Close()
			}()
		}
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
		c, err := d.Dial("tcp", "127.0.0.6:15002")
		if err != nil {
			fail(err)
			return
		}
		c.Close()
		select {
		case v.OrigDst = <-orig:
			v.OK = v.OrigDst == "127.0.0.6:15002"
		case <-time.After(3 * time.Second):
			fail(fmt.Errorf("connected, but no validation listener got the connection"))
		}
	case "linkerd":
		l, err := net.Listen("tcp", "0.0.0.0:4140")
		if err != nil {
			fail(err)
			return
		}
		token := make([]byte, 16)
		rand.Read(token)
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(hex.EncodeToString(token)))
				c.Close()
			}
		}()
		c, err := net.DialTimeout("tcp", args[1], 3*time.Second)
		if err != nil {
			fail(err)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil {
			fail(err)
			return
		}
		v.OK = string(got) == hex.EncodeToString(token)
		if !v.OK {
			fail(fmt.Errorf("wrong token %q: the connection reached another server", got))
		}
	}
}

// TestMeshValidation: the checks Istio's istio-validation and Linkerd's
// linkerd-network-validator run before a pod's app starts pass on a pod
// meshed by meshlane with no iptables at all, and fail on a pod meshlane
// does not redirect (so the check is real).
func TestMeshValidation(t *testing.T) {
	n := newNode(t, false)
	bin := probeBinary(t)
	// Nothing listens at this address of the node's own bridge subnet: if
	// the redirect fails, the connection goes nowhere else.
	unused, _ := n.br.Addr(250)
	outside := netip.AddrPortFrom(unused, 20001)
	const nobody = 65534

	run := func(p *testenv.Pod, uid uint32, args ...string) validation {
		t.Helper()
		out, err := p.Run(t, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: n.cg, Args: append([]string{bin, validateArg}, args...)}, 20*time.Second)
		var v validation
		if jerr := json.Unmarshal(out, &v); jerr != nil {
			t.Fatalf("validator output %q: %v (%v)", out, jerr, err)
		}
		return v
	}
	for _, c := range []struct {
		prof mesh.Profile
		uid  uint32
		args []string
	}{
		{mesh.Istio, mesh.Istio.ProxyUID, []string{"istio"}},
		{mesh.Linkerd, nobody, []string{"linkerd", outside.String()}},
	} {
		t.Run(c.prof.Name, func(t *testing.T) {
			meshed, bare := n.pod(c.prof.Name+"-m"), n.pod(c.prof.Name+"-b")
			n.mesh(meshed, c.prof, nil)
			if v := run(meshed, c.uid, c.args...); !v.OK {
				t.Fatalf("%s validation failed on a meshed pod: %+v", c.prof.Name, v)
			}
			if v := run(bare, c.uid, c.args...); v.OK {
				t.Fatalf("%s validation passed on a pod nothing redirects: %+v", c.prof.Name, v)
			}
		})
	}
}
