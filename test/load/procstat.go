package load

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// ProcMem is a process's memory, from /proc.
type ProcMem struct {
	// RSS and HWM (peak RSS) count every resident page, shared library
	// pages included; PSS divides shared pages among the processes
	// mapping them, so PSS summed over processes is what they cost.
	RSS, HWM, PSS int64 // bytes
}

// Mem reads pid's memory; zero values when the process is gone.
func Mem(pid int) ProcMem {
	var m ProcMem
	m.RSS = statusField(pid, "VmRSS:")
	m.HWM = statusField(pid, "VmHWM:")
	m.PSS = kbField(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss:")
	return m
}

func statusField(pid int, name string) int64 {
	return kbField(fmt.Sprintf("/proc/%d/status", pid), name)
}

// kbField reads a "Name:   123 kB" line from a /proc file, in bytes.
func kbField(path, name string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name); ok {
			fs := strings.Fields(rest)
			if len(fs) == 0 {
				return 0
			}
			v, _ := strconv.ParseInt(fs[0], 10, 64)
			return v << 10
		}
	}
	return 0
}

// Children returns the ids of pid's child processes.
func Children(pid int) []int {
	dirs, _ := os.ReadDir("/proc")
	var out []int
	for _, d := range dirs {
		child, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if fs := strings.Fields(s[i+1:]); i >= 0 && len(fs) > 1 && fs[1] == strconv.Itoa(pid) {
			out = append(out, child)
		}
	}
	return out
}

// CPU is the processor time pid has used (user and system), zero when it
// is gone.
func CPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces; fields after it are
	// counted from its closing parenthesis.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	fs := strings.Fields(s[i+1:])
	if len(fs) < 15 {
		return 0
	}
	// utime, stime, and the same of children it waited for (a server's
	// exited workers).
	var ticks int64
	for _, f := range fs[11:15] {
		n, _ := strconv.ParseInt(f, 10, 64)
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks
}

// MachineCPU is the processor time every process on the machine has used
// (/proc/stat, all but idle and iowait), and the number of processors.
func MachineCPU() (time.Duration, int) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var busy time.Duration
	cpus := 0
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "cpu "):
			fs := strings.Fields(line)[1:]
			for i, v := range fs {
				if i == 3 || i == 4 { // idle, iowait
					continue
				}
				if i >= 8 { // guest time is already in user
					break
				}
				n, _ := strconv.ParseInt(v, 10, 64)
				busy += time.Duration(n) * time.Second / clockTicks
			}
		case strings.HasPrefix(line, "cpu"):
			cpus++
		}
	}
	return busy, cpus
}

// Usage samples processor time of groups of processes over a run.
type Usage struct {
	start   time.Time
	groups  map[string][]int
	cpu0    map[string]time.Duration
	machine time.Duration
}

// StartUsage begins measuring the processor time of each group of pids.
func StartUsage(groups map[string][]int) *Usage {
	u := &Usage{start: time.Now(), groups: groups, cpu0: map[string]time.Duration{}}
	for g, pids := range groups {
		u.cpu0[g] = sumCPU(pids)
	}
	u.machine, _ = MachineCPU()
	return u
}

func sumCPU(pids []int) time.Duration {
	var d time.Duration
	for _, p := range pids {
		d += CPU(p)
	}
	return d
}

// Cores returns, per group, the processors it kept busy on average since
// StartUsage, and the same for the whole machine; cpus is the number of
// processors.
func (u *Usage) Cores() (groups map[string]float64, machine float64, cpus int) {
	wall := time.Since(u.start).Seconds()
	groups = map[string]float64{}
	for g, pids := range u.groups {
		groups[g] = (sumCPU(pids) - u.cpu0[g]).Seconds() / wall
	}
	m, cpus := MachineCPU()
	return groups, (m - u.machine).Seconds() / wall, cpus
}

// MiB formats a byte count.
func MiB(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
