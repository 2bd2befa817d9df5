/*
 * libblktapctl: the blktap control library's C interface, as blktap-rs provides it.
 *
 * The functions, types and return conventions are those of the C blktap stack's public
 * header <tap-ctl.h> (blktap 4.x), so that libxl, tapback and other C programs build and run
 * unchanged against this library. Unless said otherwise a function returns 0 on success and
 * a negative errno on failure. Strings and lists the library hands out are allocated with
 * malloc(3): the caller frees them with free(3) (lists with tap_ctl_list_free).
 *
 * Every function may be called from several threads at once.
 *
 * Differences from the C library are marked "blktap-rs:".
 */

#ifndef BLKTAP_RS_TAP_CTL_H
#define BLKTAP_RS_TAP_CTL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <errno.h>
#include <syslog.h>
#include <sys/types.h>
#include <sys/time.h>

#if defined(__has_include)
#if __has_include(<xen/xen.h>) && __has_include(<xen/grant_table.h>) && \
    __has_include(<xen/event_channel.h>)
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#define BLKTAP_RS_HAVE_XEN_TYPES 1
#endif
#endif

#ifndef BLKTAP_RS_HAVE_XEN_TYPES
/* The three Xen types the interface uses, as the Xen public headers define them. */
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
typedef uint32_t evtchn_port_t;
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * The control message (tapdisk-message.h): 544 bytes on x86_64.
 */

#define TAPDISK_MESSAGE_MAX_PATH_LENGTH 256
#define TAPDISK_MESSAGE_STRING_LENGTH 256
#define TAPDISK_MESSAGE_MAX_MINORS ((TAPDISK_MESSAGE_MAX_PATH_LENGTH / sizeof(int)) - 1)

#define TAPDISK_MESSAGE_FLAG_SHARED 0x001
#define TAPDISK_MESSAGE_FLAG_RDONLY 0x002
#define TAPDISK_MESSAGE_FLAG_ADD_CACHE 0x004
#define TAPDISK_MESSAGE_FLAG_VHD_INDEX 0x008
#define TAPDISK_MESSAGE_FLAG_ADD_LOG 0x010
#define TAPDISK_MESSAGE_FLAG_ADD_LCACHE 0x020
#define TAPDISK_MESSAGE_FLAG_REUSE_PRT 0x040
#define TAPDISK_MESSAGE_FLAG_SECONDARY 0x080
#define TAPDISK_MESSAGE_FLAG_STANDBY 0x100
#define TAPDISK_MESSAGE_FLAG_NO_O_DIRECT 0x200
#define TAPDISK_MESSAGE_FLAG_OPEN_ENCRYPTED 0x400

typedef uint32_t tapdisk_message_flag_t;

typedef struct tapdisk_message_params {
	tapdisk_message_flag_t flags;
	uint32_t devnum;
	uint32_t domid;
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];   /* "type:/path" */
	uint32_t prt_devnum;                          /* parent minor with REUSE_PRT */
	uint16_t req_timeout;                         /* seconds, 0 = tapdisk's default */
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_params_t;

typedef struct tapdisk_message_image {
	uint64_t sectors;
	uint32_t sector_size;
	uint32_t info;
} tapdisk_message_image_t;

typedef struct tapdisk_message_string {
	char text[TAPDISK_MESSAGE_STRING_LENGTH];
} tapdisk_message_string_t;

typedef struct tapdisk_message_response {
	int error;                                    /* a positive errno */
	char message[TAPDISK_MESSAGE_STRING_LENGTH];
} tapdisk_message_response_t;

typedef struct tapdisk_message_minors {
	int count;
	int list[TAPDISK_MESSAGE_MAX_MINORS];
} tapdisk_message_minors_t;

typedef struct tapdisk_message_list {
	int count;
	int minor;
	int state;
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_list_t;

typedef struct tapdisk_message_stat {
	uint16_t type;
	uint16_t cookie;
	size_t length;
} tapdisk_message_stat_t;

typedef struct tapdisk_message_blkif {
	uint32_t domid;
	uint32_t devid;
	uint32_t gref[8];
	uint32_t order;                               /* ring pages = 1 << order */
	uint32_t proto;                               /* 1 native, 2 x86_32, 3 x86_64 */
	char pool[TAPDISK_MESSAGE_STRING_LENGTH];
	uint32_t port;
	uint32_t poll_duration;
	uint32_t poll_idle_threshold;
} tapdisk_message_blkif_t;

typedef struct tapdisk_message_resume {
	tapdisk_message_flag_t flags;
	char new_params[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_resume_t;

typedef struct tapdisk_message {
	uint16_t type;
	uint16_t cookie;                              /* the minor; 0xffff = all */
	union {
		pid_t tapdisk_pid;
		tapdisk_message_image_t image;
		tapdisk_message_params_t params;
		tapdisk_message_string_t string;
		tapdisk_message_minors_t minors;
		tapdisk_message_response_t response;
		tapdisk_message_list_t list;
		tapdisk_message_stat_t info;
		tapdisk_message_blkif_t blkif;
		tapdisk_message_resume_t resume;
	} u;
} tapdisk_message_t;

enum tapdisk_message_id {
	TAPDISK_MESSAGE_ERROR = 1,
	TAPDISK_MESSAGE_RUNTIME_ERROR = 2,
	TAPDISK_MESSAGE_PID = 3,
	TAPDISK_MESSAGE_PID_RSP = 4,
	TAPDISK_MESSAGE_ATTACH = 5,
	TAPDISK_MESSAGE_ATTACH_RSP = 6,
	TAPDISK_MESSAGE_OPEN = 7,
	TAPDISK_MESSAGE_OPEN_RSP = 8,
	TAPDISK_MESSAGE_PAUSE = 9,
	TAPDISK_MESSAGE_PAUSE_RSP = 10,
	TAPDISK_MESSAGE_RESUME = 11,
	TAPDISK_MESSAGE_RESUME_RSP = 12,
	TAPDISK_MESSAGE_CLOSE = 13,
	TAPDISK_MESSAGE_CLOSE_RSP = 14,
	TAPDISK_MESSAGE_DETACH = 15,
	TAPDISK_MESSAGE_DETACH_RSP = 16,
	TAPDISK_MESSAGE_LIST_MINORS = 17,
	TAPDISK_MESSAGE_LIST_MINORS_RSP = 18,
	TAPDISK_MESSAGE_LIST = 19,
	TAPDISK_MESSAGE_LIST_RSP = 20,
	TAPDISK_MESSAGE_STATS = 21,
	TAPDISK_MESSAGE_STATS_RSP = 22,
	TAPDISK_MESSAGE_FORCE_SHUTDOWN = 23,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT = 24,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP = 25,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT = 26,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT_RSP = 27,
	TAPDISK_MESSAGE_DISK_INFO = 28,
	TAPDISK_MESSAGE_DISK_INFO_RSP = 29,
	TAPDISK_MESSAGE_EXIT = 30,
};

#if defined(__x86_64__) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(tapdisk_message_t) == 544, "tapdisk_message_t is 544 bytes");
#endif

/* ---------------------------------------------------------------------------------------
 * Lists (the C stack's list.h): a circular doubly linked list threaded through the
 * `entry` member of each tap_list_t.
 */

#ifndef BLKTAP_RS_LIST_HEAD
#define BLKTAP_RS_LIST_HEAD
struct list_head {
	struct list_head *next, *prev;
};
#endif

#define TAPCTL_COMM_RETRY_TIMEOUT 120

/* Non-zero: every failing call prints what went wrong on stderr. */
extern int tap_ctl_debug;

/* One row of tap_ctl_list: unknown fields are -1 (numbers) or NULL (strings). */
typedef struct {
	pid_t pid;
	int minor;
	int state;                                    /* 0 running, 0x2a paused */
	char *type;                                   /* "vhd", "aio", ... */
	char *path;
	struct list_head entry;
} tap_list_t;

#define tap_list_entry(_ptr) \
	((tap_list_t *)((char *)(_ptr) - offsetof(tap_list_t, entry)))

#define tap_list_for_each_entry(_pos, _head)                               \
	for ((_pos) = tap_list_entry((_head)->next); &(_pos)->entry != (_head); \
	     (_pos) = tap_list_entry((_pos)->entry.next))

#define tap_list_for_each_entry_safe(_pos, _n, _head)                         \
	for ((_pos) = tap_list_entry((_head)->next),                           \
	     (_n) = tap_list_entry((_pos)->entry.next);                        \
	     &(_pos)->entry != (_head);                                         \
	     (_pos) = (_n), (_n) = tap_list_entry((_n)->entry.next))

/* ---------------------------------------------------------------------------------------
 * Versions and checks.
 */

/* The interface version (libtool current 1, revision 1). */
void tap_ctl_version(int *major, int *minor);
/* blktap-rs: there is no blktap kernel module: -ENOSYS. */
int tap_ctl_kernel_version(int *major, int *minor);
/* blktap-rs: nothing to check (no kernel module): 0, *message untouched. */
int tap_ctl_check_blktap(const char **message);
int tap_ctl_check_version(const char **message);
/* blktap-rs: no kernel block device, hence no major: -ENOSYS. */
int tap_ctl_blk_major(void);

/* ---------------------------------------------------------------------------------------
 * Talking to a tapdisk: <control dir>/ctl<id>, one 544-byte message each way. A NULL
 * timeout waits indefinitely; a timeout is the total time allowed (-ETIMEDOUT past it).
 */

int tap_ctl_connect(const char *path, int *socket);
int tap_ctl_connect_id(int id, int *socket);
int tap_ctl_read_raw(int fd, void *buf, size_t sz, struct timeval *timeout);
int tap_ctl_read_message(int fd, tapdisk_message_t *message, struct timeval *timeout);
int tap_ctl_write_message(int fd, tapdisk_message_t *message, struct timeval *timeout);
int tap_ctl_send_and_receive(int fd, tapdisk_message_t *message, struct timeval *timeout);
int tap_ctl_connect_send_and_receive(int id, tapdisk_message_t *message,
				     struct timeval *timeout);
/* Sends the log path after the message when its flags have ADD_LOG, and the key when they
 * have OPEN_ENCRYPTED. */
int tap_ctl_connect_send_receive_ex(int id, tapdisk_message_t *message, const char *logpath,
				    uint8_t key_size, const uint8_t *encryption_key,
				    struct timeval *timeout);
/* "<control dir>/ctl<id>", to be freed by the caller; NULL on failure. */
char *tap_ctl_socket_name(int id);

/* ---------------------------------------------------------------------------------------
 * Listing: the rows `tap-ctl list` prints, in the same order. The list head is
 * (re)initialised by the call; free the rows with tap_ctl_list_free.
 */

/* blktap-rs: fails (-ETIMEDOUT, list empty) when a tapdisk does not answer within 10 s,
 * as `tap-ctl list` does, rather than listing it without its VBDs. */
int tap_ctl_list(struct list_head *list);
/* The VBDs of tapdisk pid (one pid-only row if it has none; no row if it is not running). */
int tap_ctl_list_pid(pid_t pid, struct list_head *list);
void tap_ctl_list_free(struct list_head *list);
/* The minor on which type:path is open (NULL matches any); -ENOENT if none. */
int tap_ctl_find_minor(const char *type, const char *path);

/* ---------------------------------------------------------------------------------------
 * Minors, tapdisks and VBDs.
 */

/* Allocates a minor; *devname: its marker file (free it). */
int tap_ctl_allocate(int *minor, char **devname);
int tap_ctl_free(const int minor);

/* allocate + spawn + attach + open, undone on failure. *devname: the kernel block device
 * serving the VBD (/dev/ublkbN, /dev/loopN), or its marker file when it has none, as
 * `tap-ctl create` prints it; the caller frees it. Nothing is printed.
 * blktap-rs: without a block-device choice in flags tapdisk's site default for creates
 * applies (built in: auto). */
int tap_ctl_create(const char *params, char **devname, int flags, int prt_minor,
		   char *secondary, int timeout, const char *logpath);
/* close + detach + free. As in the C library, force is not used. */
int tap_ctl_destroy(const int id, const int minor, int force, struct timeval *timeout);

/* Starts a tapdisk; returns its pid. */
int tap_ctl_spawn(void);
pid_t tap_ctl_get_pid(const int id);

int tap_ctl_attach(const int id, const int minor);
int tap_ctl_detach(const int id, const int minor);

/* Takes ownership of encryption_key (freed with free(3)) whether it succeeds or not. */
int tap_ctl_open(const int id, const int minor, const char *params, int flags,
		 const int prt_minor, const char *secondary, int timeout,
		 const char *logpath, uint8_t key_size, uint8_t *encryption_key);
int tap_ctl_close(const int id, const int minor, const int force, struct timeval *timeout);

/* Drains the VBD's requests and closes its images. */
int tap_ctl_pause(const int id, const int minor, struct timeval *timeout);
/* Reopens the images (params: another image of the same size, or NULL). */
int tap_ctl_unpause(const int id, const int minor, const char *params, int flags,
		    char *secondary, const char *logpath);

/* The statistics text of a VBD (minor -1: of every VBD), cut to size - 1 bytes and NUL
 * terminated; returns 0. */
ssize_t tap_ctl_stats(pid_t pid, int minor, char *buf, size_t size);
/* The same text and a newline, written to out. */
int tap_ctl_stats_fwrite(pid_t pid, int minor, FILE *out);

/* Connects tapdisk pid's VBD minor to a guest's shared ring (tapback): grefs holds the
 * ring's 1 << order grant references (order 0-3; NULL or another order: -EINVAL). */
int tap_ctl_connect_xenblkif(const pid_t pid, const domid_t domid, const int devid,
			     int poll_duration, int poll_idle_threshold,
			     const grant_ref_t *grefs, const int order,
			     const evtchn_port_t port, int proto, const char *pool,
			     const int minor);
/* Disconnects a guest's ring (-ENODEV when it is not connected). blktap-rs: timeout is not
 * used; the request has the library's usual deadline. */
int tap_ctl_disconnect_xenblkif(const pid_t pid, const domid_t domid, const int devid,
				struct timeval *timeout);

/* The geometry of the image open on a VBD (also while paused). */
int tap_ctl_info(pid_t pid, unsigned long long *sectors, unsigned int *sector_size,
		 unsigned int *info, const int minor);

/* Splits "type:/path/to/file" at its first ':' into two strings the caller frees;
 * -EINVAL without a ':'. */
int parse_params(const char *params, char **type, char **path);

/* ---------------------------------------------------------------------------------------
 * blktap-rs extensions (not in the C library).
 *
 * The C library uses fixed paths. This one uses the control directory /run/blktap-control
 * and the first of /usr/libexec/tapdisk and /usr/lib/blktap/tapdisk, unless the program
 * names others here (before or between calls; NULL restores the default). It reads no
 * environment variable: tapdisks it spawns are told the control directory.
 */

int tap_ctl_set_control_dir(const char *dir);
int tap_ctl_set_tapdisk(const char *path);

#ifdef __cplusplus
}
#endif

#endif /* BLKTAP_RS_TAP_CTL_H */
