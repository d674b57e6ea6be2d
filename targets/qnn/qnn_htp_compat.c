/*
 * qnn_htp_compat.c - a stand-in for libQnnHtp.so that lets ExecuTorch 1.5.1 (built against the
 * QNN 2.37 headers) drive a newer QNN HTP backend (2.4x/2.5x, e.g. the one in onnxruntime-qnn).
 *
 * Everything is forwarded to the real library (dlopen + dlsym). The one change: the HTP device
 * custom configs passed to deviceCreate are re-packed. In QNN 2.37 QnnHtpDevice_CustomConfig_t is
 * { uint32 option; union (4-byte aligned, 8 bytes) } so the payload (e.g. socModel) sits at
 * offset 4. From 2.4x the union also holds a pointer (htpExtension), so it is 8-byte aligned and
 * the payload is read at offset 8: the SoC model written at offset 4 reads as 0 ("unknown custom
 * config socModel 0", error 14001). We copy each config into the new layout before the call.
 *
 * The real library: $S2DIT_QNN_HTP_LIB, else the path compiled in with -DS2DIT_REAL_QNN_HTP="...".
 * Re-packing can be switched off with S2DIT_QNN_COMPAT_REPACK=0.
 * Built by s2dit_deploy.targets.qnn.libs with: gcc -shared -fPIC -Wl,-soname,libQnnHtp.so ... -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef S2DIT_REAL_QNN_HTP
#define S2DIT_REAL_QNN_HTP ""
#endif

#define S2DIT_COMPAT_VERSION "s2dit-qnn-htp-compat 1"
#define QNN_SUCCESS 0ULL
#define QNN_COMMON_ERROR_GENERAL 1000ULL
#define QNN_COMMON_ERROR_MEM_ALLOC 1002ULL

/* QnnInterface_t: backendId (u32), providerName (ptr), Qnn_ApiVersion_t (6 x u32), then the
 * function table; deviceCreate is entry 40 of QNN_INTERFACE_VER_TYPE (stable since QNN 2.0). */
#define IFACE_TABLE_OFFSET 40
#define IFACE_DEVICE_CREATE_SLOT 40
#define IFACE_COPY_MAX (IFACE_TABLE_OFFSET + 8 * 160)
#define MAX_PROVIDERS 16

/* QnnDevice_Config_t: { uint32 option; union { void* customConfig; ... } } */
#define QNN_DEVICE_CONFIG_OPTION_CUSTOM 0u
typedef struct {
  uint32_t option;
  void *custom_config;
} DeviceConfig;

/* 2.37 layout (what ExecuTorch 1.5.1 writes) and 2.4x layout (what the backend reads). */
typedef struct {
  uint32_t option;
  uint32_t payload[2];
} HtpCustomConfigV237;
typedef struct {
  uint32_t option;
  uint32_t pad;
  union {
    uint32_t payload[2];
    void *ext;
  } u;
} HtpCustomConfigV24;

typedef uint64_t (*GetProvidersFn)(const void ***, uint32_t *);
typedef uint64_t (*DeviceCreateFn)(void *, const DeviceConfig **, void **);

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static void *g_real = NULL;
static unsigned char g_copies[MAX_PROVIDERS][IFACE_COPY_MAX] __attribute__((aligned(16)));
static const void *g_list[MAX_PROVIDERS];
static DeviceCreateFn g_real_device_create[MAX_PROVIDERS];
static uint32_t g_num = 0;
static int g_ready = 0;
static unsigned long g_repacked = 0;
static char g_error[512];

static void set_error(const char *what, const char *detail) {
  snprintf(g_error, sizeof g_error, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
  fprintf(stderr, "[s2dit qnn compat] %s\n", g_error);
}

/* Re-pack one HTP custom config from the 2.37 layout to the 2.4x layout (exported for tests). */
void s2dit_qnn_compat_repack(const void *old_cfg, void *new_cfg) {
  const HtpCustomConfigV237 *o = (const HtpCustomConfigV237 *)old_cfg;
  HtpCustomConfigV24 *n = (HtpCustomConfigV24 *)new_cfg;
  memset(n, 0, sizeof *n);
  n->option = o->option;
  memcpy(n->u.payload, o->payload, sizeof o->payload);
}

unsigned long s2dit_qnn_compat_repacked(void) { return g_repacked; }
const char *s2dit_qnn_compat_version(void) { return S2DIT_COMPAT_VERSION; }
const char *s2dit_qnn_compat_last_error(void) { return g_error; }
const char *s2dit_qnn_compat_real_path(void) {
  const char *env = getenv("S2DIT_QNN_HTP_LIB");
  return (env && *env) ? env : S2DIT_REAL_QNN_HTP;
}

static int repack_enabled(void) {
  const char *env = getenv("S2DIT_QNN_COMPAT_REPACK");
  return !(env && env[0] == '0');
}

static uint64_t device_create_common(int idx, void *logger, const DeviceConfig **config,
                                     void **device) {
  DeviceCreateFn real = g_real_device_create[idx];
  if (!real) return QNN_COMMON_ERROR_GENERAL;
  if (!config || !repack_enabled()) return real(logger, config, device);
  size_t n = 0;
  while (config[n]) n++;
  const DeviceConfig **list = calloc(n + 1, sizeof *list);
  DeviceConfig *cfgs = calloc(n ? n : 1, sizeof *cfgs);
  HtpCustomConfigV24 *htp = calloc(n ? n : 1, sizeof *htp);
  if (!list || !cfgs || !htp) {
    free(list), free(cfgs), free(htp);
    return QNN_COMMON_ERROR_MEM_ALLOC;
  }
  for (size_t i = 0; i < n; i++) {
    cfgs[i] = *config[i];
    if (cfgs[i].option == QNN_DEVICE_CONFIG_OPTION_CUSTOM && cfgs[i].custom_config) {
      s2dit_qnn_compat_repack(cfgs[i].custom_config, &htp[i]);
      cfgs[i].custom_config = &htp[i];
      __atomic_add_fetch(&g_repacked, 1, __ATOMIC_RELAXED);
    }
    list[i] = &cfgs[i];
  }
  uint64_t rc = real(logger, list, device);
  free(list), free(cfgs), free(htp);
  return rc;
}

/* One trampoline per provider slot (a plain C function pointer carries no context). */
#define TRAMPOLINE(i)                                                                        \
  static uint64_t device_create_##i(void *l, const DeviceConfig **c, void **d) {             \
    return device_create_common(i, l, c, d);                                                 \
  }
TRAMPOLINE(0) TRAMPOLINE(1) TRAMPOLINE(2) TRAMPOLINE(3) TRAMPOLINE(4) TRAMPOLINE(5)
TRAMPOLINE(6) TRAMPOLINE(7) TRAMPOLINE(8) TRAMPOLINE(9) TRAMPOLINE(10) TRAMPOLINE(11)
TRAMPOLINE(12) TRAMPOLINE(13) TRAMPOLINE(14) TRAMPOLINE(15)
static const DeviceCreateFn g_trampolines[MAX_PROVIDERS] = {
    device_create_0,  device_create_1,  device_create_2,  device_create_3,
    device_create_4,  device_create_5,  device_create_6,  device_create_7,
    device_create_8,  device_create_9,  device_create_10, device_create_11,
    device_create_12, device_create_13, device_create_14, device_create_15};

/* Bytes readable from addr inside the loaded segment that holds it (so the copy never faults). */
struct seg_query {
  uintptr_t addr;
  size_t avail;
};
static int find_segment(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  struct seg_query *q = data;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD) continue;
    uintptr_t start = info->dlpi_addr + ph->p_vaddr, end = start + ph->p_memsz;
    if (q->addr >= start && q->addr < end) {
      q->avail = end - q->addr;
      return 1;
    }
  }
  return 0;
}

/* Bytes readable from addr (bounded by max): its ELF segment when it lies in one, else the run
 * of mapped pages (mincore fails with ENOMEM on an unmapped page). */
static size_t readable_bytes(const void *addr, size_t max) {
  struct seg_query q = {(uintptr_t)addr, 0};
  if (dl_iterate_phdr(find_segment, &q)) return q.avail < max ? q.avail : max;
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t start = (uintptr_t)addr, p = start & ~(page - 1), end = start + max;
  unsigned char vec;
  for (; p < end; p += page)
    if (mincore((void *)p, page, &vec) != 0) break;
  if (p <= start) return 0;
  return (p - start) < max ? (size_t)(p - start) : max;
}

static int load_real(void) {
  if (g_ready) return 0;
  const char *path = s2dit_qnn_compat_real_path();
  if (!path || !*path) {
    set_error("no real QNN HTP library configured", "set S2DIT_QNN_HTP_LIB");
    return -1;
  }
  g_real = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!g_real) {
    set_error("cannot load the real QNN HTP library", dlerror());
    return -1;
  }
  GetProvidersFn get = (GetProvidersFn)dlsym(g_real, "QnnInterface_getProviders");
  if (!get) {
    set_error("real library lacks QnnInterface_getProviders", path);
    return -1;
  }
  const void **real_list = NULL;
  uint32_t num = 0;
  uint64_t rc = get(&real_list, &num);
  if (rc != QNN_SUCCESS) return -1;
  if (num > MAX_PROVIDERS) num = MAX_PROVIDERS;
  for (uint32_t i = 0; i < num; i++) {
    size_t len = readable_bytes(real_list[i], IFACE_COPY_MAX);
    if (len < IFACE_TABLE_OFFSET + 8 * (IFACE_DEVICE_CREATE_SLOT + 1)) {
      set_error("QNN provider table is smaller than expected", path);
      return -1;
    }
    memcpy(g_copies[i], real_list[i], len);
    DeviceCreateFn *slot =
        (DeviceCreateFn *)(g_copies[i] + IFACE_TABLE_OFFSET + 8 * IFACE_DEVICE_CREATE_SLOT);
    g_real_device_create[i] = *slot;
    *slot = g_trampolines[i];
    g_list[i] = g_copies[i];
  }
  g_num = num;
  g_ready = 1;
  return 0;
}

uint64_t QnnInterface_getProviders(const void ***provider_list, uint32_t *num_providers) {
  if (!provider_list || !num_providers) return QNN_COMMON_ERROR_GENERAL;
  pthread_mutex_lock(&g_lock);
  int err = load_real();
  pthread_mutex_unlock(&g_lock);
  if (err) return QNN_COMMON_ERROR_GENERAL;
  *provider_list = g_list;
  *num_providers = g_num;
  return QNN_SUCCESS;
}
