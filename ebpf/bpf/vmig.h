/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Types shared between the BPF programs (vmig.bpf.c) and the Rust loader
 * (src/raw.rs mirrors every struct here; its size assertions must match).
 * Every struct is laid out without implicit padding.
 */
#ifndef VMIG_H
#define VMIG_H

#include <linux/types.h>

/* Kinds of `struct vmig_event`. 0 is reserved as invalid. */
enum vmig_event_kind {
	VMIG_EV_INVALID = 0,
	VMIG_EV_KVM_PAGE_FAULT = 1,   /* addr = gpa, aux = error code */
	VMIG_EV_DIRTY_RING_PUSH = 2,  /* slot, addr = gfn offset in slot, aux = ring used entries */
	VMIG_EV_DIRTY_RING_FULL = 3,  /* vcpu exits with KVM_EXIT_DIRTY_RING_FULL */
	VMIG_EV_USER_FAULT = 4,       /* addr = hva, aux = x86 error code, slot = 1 if kernel mode */
	VMIG_EV_USER_FAULT_RESOLVED = 5, /* addr = page hva, aux = latency ns, tid = faulting thread */
	VMIG_EV_DIRTY_RING_RESET = 6, /* aux = entries reset (dirty_index - reset_index before) */
};

/* One record of the `events` ring buffer. 40 bytes. */
struct vmig_event {
	__u64 ts_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 addr;
	__u64 aux;
	__u32 kind; /* enum vmig_event_kind */
	__u32 tid;  /* thread that hit the tracepoint (faulting thread for RESOLVED) */
	__u32 vcpu; /* vCPU index, or 0xffffffff if not a vCPU thread */
	__u32 slot;
};

/* Filter and switches: single entry (key 0) of the `config` array map. 32 bytes. */
struct vmig_config {
	__u64 mem_start;   /* guest memory host-virtual range [mem_start, mem_start + mem_len) */
	__u64 mem_len;
	__u32 tgid;        /* the VMM process */
	__u32 events;      /* 1: emit ring-buffer events, 0: counters only */
	__u32 generation;  /* dirty-page window generation (see dirty_pages) */
	__u32 _pad;
};

/* Entries of the `vcpu_tid_cache` array (a power of two). */
#define VMIG_TID_CACHE 4096
/* A `vcpu_tid_cache` slot whose tid was removed: never a thread id. */
#define VMIG_TID_TOMBSTONE 0xffffffffU

/* Value of the `vcpu_tid_cache` array. 8 bytes. */
struct vmig_tid_slot {
	__u32 tid;  /* 0: empty */
	__u32 vcpu;
};

/* Indices of the `counters` per-CPU array. */
enum vmig_counter {
	VMIG_C_KVM_PAGE_FAULTS = 0,
	VMIG_C_DIRTY_RING_PUSHES = 1,
	VMIG_C_DIRTY_RING_FULL = 2,
	VMIG_C_DIRTY_PAGES_DISTINCT = 3,
	VMIG_C_USER_FAULTS = 4,
	VMIG_C_USER_FAULTS_RESOLVED = 5,
	VMIG_C_USER_FAULT_WAIT_NS = 6,
	VMIG_C_UFFD_IOCTLS = 7,
	VMIG_C_KVM_EXITS = 8,
	VMIG_C_EVENTS_DROPPED = 9,
	VMIG_C_DIRTY_RING_RESETS = 10,
	VMIG_C_KERNEL_MODE_FAULTS = 11,
	VMIG_C_EMULATED_INSNS = 12,
	VMIG_C_MAX = 16,
};

/* Key of the `exits` hash: exit reason per vCPU. 8 bytes. */
struct vmig_exit_key {
	__u32 vcpu;
	__u32 reason;
};

/* Key of the `dirty_pages` LRU hash: one guest page. 16 bytes. */
struct vmig_page_key {
	__u64 offset; /* gfn offset inside the memslot */
	__u32 slot;   /* as_id << 16 | slot id, as KVM reports it */
	__u32 _pad;
};

#endif /* VMIG_H */
