package testenv

import (
	"fmt"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// MeshlanePrograms counts the meshlane programs (named meshlane_*) that
// processes in c run on hook typ: those attached to c and its ancestors.
func (c *Cgroup) MeshlanePrograms(typ ebpf.AttachType) (int, error) {
	res, err := link.QueryPrograms(link.QueryOptions{Target: c.FD(), Attach: typ, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE})
	if err != nil {
		return 0, fmt.Errorf("query %s programs of %s: %w", typ, c.Path, err)
	}
	n := 0
	for _, p := range res.Programs {
		prog, err := ebpf.NewProgramFromID(p.ID)
		if err != nil {
			return 0, err
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			return 0, err
		}
		if strings.HasPrefix(info.Name, "meshlane_") {
			n++
		}
	}
	return n, nil
}

// WaitMeshlanePrograms waits up to 5 s until processes in c run want
// meshlane programs on each of the hooks: the kernel releases a link whose
// last pin is removed in a work item, a moment after the unlink returns.
func (c *Cgroup) WaitMeshlanePrograms(want int, hooks ...ebpf.AttachType) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		var wrong []string
		for _, typ := range hooks {
			n, err := c.MeshlanePrograms(typ)
			if err != nil {
				return err
			}
			if n != want {
				wrong = append(wrong, fmt.Sprintf("%d on %s", n, typ))
			}
		}
		if len(wrong) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes in %s run meshlane programs %s, want %d on each", c.Path, strings.Join(wrong, ", "), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
