// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * vmig: kernel-side probes for one VM's dirty-page rate, KVM faults, exits and
 * post-copy (userfaultfd) fault latency. Loaded and read by src/lib.rs (aya).
 *
 * Only static tracepoints are used (this kernel has no kprobes). The tracepoint
 * context structs below are written by hand from
 * /sys/kernel/tracing/events/<group>/<event>/format; the loader checks every
 * field offset used here against the running kernel's format files before
 * attaching (src/layout.rs), so a changed layout is an error, never garbage.
 * One program, vmig_dirty_ring_push_btf, is a BTF tracepoint (tp_btf) on the
 * hottest event: it reads the tracepoint's raw arguments, not a record, and the
 * kernel's verifier checks them against the event's TP_PROTO in kernel BTF.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/userfaultfd.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "vmig.h"

char LICENSE[] SEC("license") = "GPL";

#define PAGE_SIZE 4096ULL
#define PAGE_MASK (~(PAGE_SIZE - 1))
#define NO_VCPU 0xffffffffU
#define EEXIST 17
/* Pages of one UFFDIO_COPY/ZEROPAGE checked against pending faults (16 MiB). */
#define MAX_RESOLVE_PAGES 4096

/* ---- tracepoint contexts (see the format files) ---- */

struct tp_common {
	__u16 common_type;
	__u8 common_flags;
	__u8 common_preempt_count;
	__s32 common_pid;
};

struct tp_kvm_page_fault { /* kvm:kvm_page_fault */
	struct tp_common c;
	__u32 vcpu_id;     /* 8 */
	__u32 _pad;
	__u64 guest_rip;   /* 16 */
	__u64 fault_address; /* 24 */
	__u64 error_code;  /* 32 */
};

struct tp_kvm_dirty_ring_push { /* kvm:kvm_dirty_ring_push */
	struct tp_common c;
	__s32 index;       /* 8: ring index == vcpu id */
	__u32 dirty_index; /* 12 */
	__u32 reset_index; /* 16 */
	__u32 slot;        /* 20 */
	__u64 offset;      /* 24 */
};

struct tp_kvm_dirty_ring_reset { /* kvm:kvm_dirty_ring_reset */
	struct tp_common c;
	__s32 index;       /* 8 */
	__u32 dirty_index; /* 12 */
	__u32 reset_index; /* 16 */
};

struct tp_kvm_dirty_ring_exit { /* kvm:kvm_dirty_ring_exit */
	struct tp_common c;
	__s32 vcpu_id;     /* 8 */
};

struct tp_kvm_exit { /* kvm:kvm_exit */
	struct tp_common c;
	__u32 exit_reason; /* 8 */
	__u32 _pad0;
	__u64 guest_rip;   /* 16 */
	__u32 isa;         /* 24 */
	__u32 _pad1;
	__u64 info1;       /* 32 */
	__u64 info2;       /* 40 */
	__u32 intr_info;   /* 48 */
	__u32 error_code;  /* 52 */
	__u32 vcpu_id;     /* 56 */
};

struct tp_page_fault { /* exceptions:page_fault_user / page_fault_kernel */
	struct tp_common c;
	__u64 address;     /* 8 */
	__u64 ip;          /* 16 */
	__u64 error_code;  /* 24 */
};

struct tp_sys_enter_ioctl { /* syscalls:sys_enter_ioctl */
	struct tp_common c;
	__s32 syscall_nr;  /* 8 */
	__u32 _pad;
	__u64 fd;          /* 16 */
	__u64 cmd;         /* 24 */
	__u64 arg;         /* 32 */
};

struct tp_sys_exit_ioctl { /* syscalls:sys_exit_ioctl */
	struct tp_common c;
	__s32 syscall_nr;  /* 8 */
	__u32 _pad;
	__s64 ret;         /* 16 */
};

/* ---- maps ---- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vmig_config);
} config SEC(".maps");

/* vCPU thread id -> vCPU index. Only these threads count for kvm:* events. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} vcpu_tids SEC(".maps");

/*
 * Direct-mapped cache of vcpu_tids for the dirty-ring push (an inlined array lookup instead of a
 * hash): slot tid & (VMIG_TID_CACHE - 1) holds a vCPU thread's tid and index, 0 if no vCPU thread
 * maps there, VMIG_TID_TOMBSTONE if one was removed. User space (src/lib.rs) writes a tid here
 * only into an empty slot and always into vcpu_tids too, so a slot holding another tid (a
 * collision) or the tombstone sends the program to vcpu_tids: the same answer, slower.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VMIG_TID_CACHE);
	__type(key, __u32);
	__type(value, struct vmig_tid_slot);
} vcpu_tid_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VMIG_C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct vmig_exit_key);
	__type(value, __u64);
} exits SEC(".maps");

/*
 * Dirty pages seen in the current window: page -> generation of the window in
 * which it was last counted. A push whose page is absent or carries an older
 * generation counts one distinct page. The loader sizes it to the guest's page
 * count; LRU eviction (only if undersized) can only over-count.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct vmig_page_key);
	__type(value, __u32);
} dirty_pages SEC(".maps");

/*
 * The same window generations for memslot 0 (guest RAM), indexed by gfn offset: an inlined array
 * lookup instead of hashing a 16-byte key. Used by the BTF push program; pages of other slots, or
 * beyond the array, go to dirty_pages. The loader sizes it like dirty_pages.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, __u32);
} dirty_gen_slot0 SEC(".maps");

/* Page-aligned faulting hva -> fault time and thread, until UFFDIO_COPY/ZEROPAGE. */
struct pending_fault {
	__u64 ts_ns;
	__u32 tid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pending_fault);
} pending_faults SEC(".maps");

/* Thread id -> the UFFDIO_COPY/ZEROPAGE it is inside of. */
struct inflight_ioctl {
	__u64 arg;   /* user pointer to struct uffdio_copy / uffdio_zeropage */
	__u64 start; /* destination range */
	__u64 len;
	__u32 cmd;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct inflight_ioctl);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* 4 MiB */
} events SEC(".maps");

/* ---- helpers ---- */

static __always_inline struct vmig_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline void count(__u32 idx, __u64 by)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += by; /* per-CPU: no atomics needed */
}

static __always_inline __u32 current_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline __u32 current_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

/* The vCPU index of the current thread if it is one of the VM's vCPU threads. */
static __always_inline __u32 *current_vcpu(struct vmig_config *cfg)
{
	__u32 tid;

	if (current_tgid() != cfg->tgid)
		return 0;
	tid = current_tid();
	return bpf_map_lookup_elem(&vcpu_tids, &tid);
}

static __always_inline void emit(struct vmig_config *cfg, __u32 kind, __u32 tid, __u32 vcpu,
				 __u32 slot, __u64 addr, __u64 aux, __u64 ts)
{
	struct vmig_event *e;

	if (!cfg->events)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(VMIG_C_EVENTS_DROPPED, 1);
		return;
	}
	e->ts_ns = ts;
	e->addr = addr;
	e->aux = aux;
	e->kind = kind;
	e->tid = tid;
	e->vcpu = vcpu;
	e->slot = slot;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int in_guest_memory(struct vmig_config *cfg, __u64 addr)
{
	return addr >= cfg->mem_start && addr - cfg->mem_start < cfg->mem_len;
}

/* ---- KVM ---- */

SEC("tp/kvm/kvm_page_fault")
int vmig_kvm_page_fault(struct tp_kvm_page_fault *ctx)
{
	struct vmig_config *cfg = get_config();
	__u32 *vcpu;

	if (!cfg || !(vcpu = current_vcpu(cfg)))
		return 0;
	count(VMIG_C_KVM_PAGE_FAULTS, 1);
	emit(cfg, VMIG_EV_KVM_PAGE_FAULT, current_tid(), *vcpu, 0, ctx->fault_address,
	     ctx->error_code, bpf_ktime_get_ns());
	return 0;
}

SEC("tp/kvm/kvm_dirty_ring_push")
int vmig_dirty_ring_push(struct tp_kvm_dirty_ring_push *ctx)
{
	struct vmig_config *cfg = get_config();
	struct vmig_page_key key = {};
	__u32 *vcpu, *gen;

	if (!cfg || !(vcpu = current_vcpu(cfg)))
		return 0;
	count(VMIG_C_DIRTY_RING_PUSHES, 1);

	key.offset = ctx->offset;
	key.slot = ctx->slot;
	gen = bpf_map_lookup_elem(&dirty_pages, &key);
	if (!gen || *gen != cfg->generation) {
		__u32 g = cfg->generation;
		bpf_map_update_elem(&dirty_pages, &key, &g, BPF_ANY);
		count(VMIG_C_DIRTY_PAGES_DISTINCT, 1);
	}
	emit(cfg, VMIG_EV_DIRTY_RING_PUSH, current_tid(), *vcpu, ctx->slot, ctx->offset,
	     ctx->dirty_index - ctx->reset_index, bpf_ktime_get_ns());
	return 0;
}

/*
 * The same counts from a BTF tracepoint (the kernel calls it with the tracepoint's raw arguments,
 * TP_PROTO(struct kvm_dirty_ring *ring, u32 slot, u64 offset); nothing is formatted for it), with
 * the lightest body: the vCPU check through vcpu_tid_cache and slot 0's window generations in an
 * array. Counters only: the loader uses it when no events are wanted (the migration's
 * ProbeSet::DirtyRing, `vmig trace --counters-only`) and the classic program above otherwise,
 * or when BTF tracepoints are unavailable.
 */
struct kvm_dirty_ring;

SEC("tp_btf/kvm_dirty_ring_push")
int BPF_PROG(vmig_dirty_ring_push_btf, struct kvm_dirty_ring *ring, __u32 slot, __u64 offset)
{
	struct vmig_config *cfg = get_config();
	struct vmig_tid_slot *ts;
	__u64 pid_tgid;
	__u32 tid, idx, *gen;

	if (!cfg)
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	if ((__u32)(pid_tgid >> 32) != cfg->tgid)
		return 0;
	tid = (__u32)pid_tgid;
	idx = tid & (VMIG_TID_CACHE - 1);
	ts = bpf_map_lookup_elem(&vcpu_tid_cache, &idx);
	if (!ts || ts->tid == 0)
		return 0;
	if (ts->tid != tid && !bpf_map_lookup_elem(&vcpu_tids, &tid))
		return 0;
	count(VMIG_C_DIRTY_RING_PUSHES, 1);

	if (slot == 0 && offset < 0xffffffffULL) {
		idx = (__u32)offset;
		gen = bpf_map_lookup_elem(&dirty_gen_slot0, &idx);
		if (gen) {
			if (*gen != cfg->generation) {
				*gen = cfg->generation;
				count(VMIG_C_DIRTY_PAGES_DISTINCT, 1);
			}
			return 0;
		}
	}
	{
		struct vmig_page_key key = { .offset = offset, .slot = slot };
		__u32 g = cfg->generation;

		gen = bpf_map_lookup_elem(&dirty_pages, &key);
		if (!gen || *gen != g) {
			bpf_map_update_elem(&dirty_pages, &key, &g, BPF_ANY);
			count(VMIG_C_DIRTY_PAGES_DISTINCT, 1);
		}
	}
	return 0;
}

SEC("tp/kvm/kvm_dirty_ring_exit")
int vmig_dirty_ring_exit(struct tp_kvm_dirty_ring_exit *ctx)
{
	struct vmig_config *cfg = get_config();
	__u32 *vcpu;

	if (!cfg || !(vcpu = current_vcpu(cfg)))
		return 0;
	count(VMIG_C_DIRTY_RING_FULL, 1);
	emit(cfg, VMIG_EV_DIRTY_RING_FULL, current_tid(), *vcpu, 0, 0, 0, bpf_ktime_get_ns());
	return 0;
}

/* KVM_RESET_DIRTY_RINGS runs on whichever VMM thread harvests: filter by process. */
SEC("tp/kvm/kvm_dirty_ring_reset")
int vmig_dirty_ring_reset(struct tp_kvm_dirty_ring_reset *ctx)
{
	struct vmig_config *cfg = get_config();

	if (!cfg || current_tgid() != cfg->tgid)
		return 0;
	count(VMIG_C_DIRTY_RING_RESETS, 1);
	emit(cfg, VMIG_EV_DIRTY_RING_RESET, current_tid(), (__u32)ctx->index, 0, 0,
	     ctx->dirty_index - ctx->reset_index, bpf_ktime_get_ns());
	return 0;
}

/*
 * Instructions KVM's emulator ran for the vCPUs (counter only). Emulated guests (real mode here,
 * everything on some nested setups) write guest memory through the emulator: this tells why
 * dirty rates are low and why each write pushes its own dirty-ring entry.
 */
SEC("tp/kvm/kvm_emulate_insn")
int vmig_kvm_emulate_insn(void *ctx)
{
	struct vmig_config *cfg = get_config();

	if (cfg && current_vcpu(cfg))
		count(VMIG_C_EMULATED_INSNS, 1);
	return 0;
}

/* Counters only: exits are far too frequent for one event each. */
SEC("tp/kvm/kvm_exit")
int vmig_kvm_exit(struct tp_kvm_exit *ctx)
{
	struct vmig_config *cfg = get_config();
	struct vmig_exit_key key = {};
	__u64 one = 1, *v;
	__u32 *vcpu;

	if (!cfg || !(vcpu = current_vcpu(cfg)))
		return 0;
	count(VMIG_C_KVM_EXITS, 1);
	key.vcpu = *vcpu;
	key.reason = ctx->exit_reason;
	v = bpf_map_lookup_elem(&exits, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&exits, &key, &one, BPF_NOEXIST);
	return 0;
}

/* ---- user faults on guest memory and their userfaultfd resolution ---- */

static __always_inline int on_page_fault(struct tp_page_fault *ctx, __u32 kernel_mode)
{
	struct vmig_config *cfg = get_config();
	struct pending_fault pf = {};
	__u64 page, ts;
	__u32 *vcpu;

	if (!cfg || current_tgid() != cfg->tgid || !in_guest_memory(cfg, ctx->address))
		return 0;
	ts = bpf_ktime_get_ns();
	count(VMIG_C_USER_FAULTS, 1);
	if (kernel_mode)
		count(VMIG_C_KERNEL_MODE_FAULTS, 1);
	page = ctx->address & PAGE_MASK;
	pf.ts_ns = ts;
	pf.tid = current_tid();
	/* Keep the first fault on a page: it has waited the longest. */
	bpf_map_update_elem(&pending_faults, &page, &pf, BPF_NOEXIST);
	vcpu = bpf_map_lookup_elem(&vcpu_tids, &pf.tid);
	emit(cfg, VMIG_EV_USER_FAULT, pf.tid, vcpu ? *vcpu : NO_VCPU, kernel_mode, ctx->address,
	     ctx->error_code, ts);
	return 0;
}

SEC("tp/exceptions/page_fault_user")
int vmig_page_fault_user(struct tp_page_fault *ctx)
{
	return on_page_fault(ctx, 0);
}

/* Kernel-mode faults on user addresses: KVM's emulator and copy_{to,from}_user. */
SEC("tp/exceptions/page_fault_kernel")
int vmig_page_fault_kernel(struct tp_page_fault *ctx)
{
	return on_page_fault(ctx, 1);
}

SEC("tp/syscalls/sys_enter_ioctl")
int vmig_sys_enter_ioctl(struct tp_sys_enter_ioctl *ctx)
{
	struct vmig_config *cfg = get_config();
	struct inflight_ioctl io = {};
	__u32 cmd = (__u32)ctx->cmd;
	__u32 tid;

	if (!cfg || current_tgid() != cfg->tgid)
		return 0;
	if (cmd != UFFDIO_COPY && cmd != UFFDIO_ZEROPAGE)
		return 0;
	if (cmd == UFFDIO_COPY) {
		struct uffdio_copy c;
		if (bpf_probe_read_user(&c, sizeof(c), (void *)ctx->arg))
			return 0;
		io.start = c.dst;
		io.len = c.len;
	} else {
		struct uffdio_zeropage z;
		if (bpf_probe_read_user(&z, sizeof(z), (void *)ctx->arg))
			return 0;
		io.start = z.range.start;
		io.len = z.range.len;
	}
	if (!in_guest_memory(cfg, io.start))
		return 0;
	io.arg = ctx->arg;
	io.cmd = cmd;
	tid = current_tid();
	bpf_map_update_elem(&inflight, &tid, &io, BPF_ANY);
	return 0;
}

struct resolve_ctx {
	struct vmig_config *cfg;
	__u64 start;
	__u64 now;
};

static long resolve_page(__u64 i, struct resolve_ctx *rc)
{
	__u64 page = rc->start + i * PAGE_SIZE;
	struct pending_fault *pf;
	__u64 latency;
	__u32 *vcpu, tid;

	pf = bpf_map_lookup_elem(&pending_faults, &page);
	if (!pf)
		return 0;
	/* A fault recorded after the copy that resolved it was done (its tracepoint ran late on
	 * another CPU: a nested guest's vCPU can be descheduled between the exception and the
	 * probe) waited for nothing here: latency 0, never a wrapped difference. */
	latency = rc->now > pf->ts_ns ? rc->now - pf->ts_ns : 0;
	tid = pf->tid;
	bpf_map_delete_elem(&pending_faults, &page);
	count(VMIG_C_USER_FAULTS_RESOLVED, 1);
	count(VMIG_C_USER_FAULT_WAIT_NS, latency);
	vcpu = bpf_map_lookup_elem(&vcpu_tids, &tid);
	emit(rc->cfg, VMIG_EV_USER_FAULT_RESOLVED, tid, vcpu ? *vcpu : NO_VCPU, 0, page, latency,
	     rc->now);
	return 0;
}

SEC("tp/syscalls/sys_exit_ioctl")
int vmig_sys_exit_ioctl(struct tp_sys_exit_ioctl *ctx)
{
	struct vmig_config *cfg = get_config();
	struct inflight_ioctl *io;
	struct resolve_ctx rc = {};
	__u64 done, pages;
	__u32 tid;

	if (!cfg || current_tgid() != cfg->tgid)
		return 0;
	tid = current_tid();
	io = bpf_map_lookup_elem(&inflight, &tid);
	if (!io)
		return 0;
	count(VMIG_C_UFFD_IOCTLS, 1);

	done = io->len;
	if (ctx->ret < 0 && ctx->ret != -EEXIST) {
		/* Partial (EAGAIN) or failed: the struct says how much was mapped. */
		__s64 n = 0;
		void *field = io->cmd == UFFDIO_COPY
				      ? (void *)(io->arg + __builtin_offsetof(struct uffdio_copy, copy))
				      : (void *)(io->arg + __builtin_offsetof(struct uffdio_zeropage, zeropage));
		if (bpf_probe_read_user(&n, sizeof(n), field) || n < 0)
			n = 0;
		done = (__u64)n;
	}
	rc.cfg = cfg;
	rc.start = io->start & PAGE_MASK;
	rc.now = bpf_ktime_get_ns();
	bpf_map_delete_elem(&inflight, &tid);

	pages = (done + PAGE_SIZE - 1) / PAGE_SIZE;
	if (pages > MAX_RESOLVE_PAGES)
		pages = MAX_RESOLVE_PAGES;
	if (pages)
		bpf_loop(pages, resolve_page, &rc, 0);
	return 0;
}
