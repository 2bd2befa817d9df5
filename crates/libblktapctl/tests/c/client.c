/*
 * A C client of libblktapctl, built and run by tests/c_abi.rs (under valgrind): the calls
 * libxl makes (find, create, find again, destroy), those tapback makes (list_pid, info),
 * the listing, and the argument checks. It prints what it got, one fact per line, so the
 * test can compare it with `tap-ctl list`; anything the library printed would show up too.
 *
 *   client CTL_DIR TAPDISK create IMAGE
 *   client CTL_DIR TAPDISK list
 *   client CTL_DIR TAPDISK tapback PID MINOR   (also pause, unpause, stats)
 *   client CTL_DIR TAPDISK destroy PID MINOR IMAGE
 *   client CTL_DIR TAPDISK checks      (argument checks, simple calls, four threads)
 */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tap-ctl.h>

#define CHECK(cond)                                                              \
	do {                                                                     \
		if (!(cond)) {                                                   \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,   \
				__LINE__, #cond);                                \
			exit(1);                                                 \
		}                                                                \
	} while (0)

static void print_rows(struct list_head *list)
{
	tap_list_t *row;

	tap_list_for_each_entry(row, list) {
		/* The key=value format of `tap-ctl list`, fields omitted when unknown. */
		const char *sep = "";
		if (row->pid != -1) {
			printf("pid=%d", row->pid);
			sep = " ";
		}
		if (row->minor != -1) {
			printf("%sminor=%d", sep, row->minor);
			sep = " ";
		}
		if (row->state != -1) {
			printf("%sstate=%#x", sep, row->state);
			sep = " ";
		}
		if (row->type && row->path)
			printf("%sargs=%s:%s", sep, row->type, row->path);
		printf("\n");
	}
}

static int create(const char *image)
{
	char params[512];
	char *devname = NULL;
	int minor, again;

	snprintf(params, sizeof(params), "aio:%s", image);

	/* libxl: is the image attached already? */
	CHECK(tap_ctl_find_minor("aio", image) == -ENOENT);

	CHECK(tap_ctl_create(params, &devname, 0, -1, NULL, 0, NULL) == 0);
	CHECK(devname != NULL);

	minor = tap_ctl_find_minor("aio", image);
	CHECK(minor >= 0);
	again = tap_ctl_find_minor(NULL, image);
	CHECK(again == minor);

	printf("minor=%d device=%s\n", minor, devname);
	free(devname);
	return 0;
}

static int list(void)
{
	struct list_head list;

	CHECK(tap_ctl_list(&list) == 0);
	print_rows(&list);
	tap_ctl_list_free(&list);
	CHECK(list.next == &list && list.prev == &list);
	return 0;
}

static int tapback(pid_t pid, int minor)
{
	struct list_head list;
	tap_list_t *row;
	unsigned long long sectors = 0;
	unsigned int sector_size = 0, info = 7;
	char stats[4096];
	int rows = 0;

	CHECK(tap_ctl_list_pid(pid, &list) == 0);
	tap_list_for_each_entry(row, &list) {
		CHECK(row->pid == pid);
		if (row->minor == minor)
			rows++;
	}
	CHECK(rows == 1);
	print_rows(&list);
	tap_ctl_list_free(&list);

	CHECK(tap_ctl_get_pid(pid) == pid);
	CHECK(tap_ctl_info(pid, &sectors, &sector_size, &info, minor) == 0);
	printf("sectors=%llu sector_size=%u info=%u\n", sectors, sector_size, info);

	CHECK(tap_ctl_stats(pid, minor, stats, sizeof(stats)) == 0);
	CHECK(stats[0] == '{');
	/* A buffer too small gets the start of the text, NUL terminated. */
	CHECK(tap_ctl_stats(pid, minor, stats, 4) == 0);
	CHECK(strlen(stats) == 3);

	/* The raw message calls: a PID request by hand. */
	{
		tapdisk_message_t message;
		struct timeval timeout = { .tv_sec = 10, .tv_usec = 0 };
		int fd;

		memset(&message, 0, sizeof(message));
		message.type = TAPDISK_MESSAGE_PID;
		CHECK(tap_ctl_connect_send_and_receive(pid, &message, &timeout) == 0);
		CHECK(message.type == TAPDISK_MESSAGE_PID_RSP);
		CHECK(message.u.tapdisk_pid == pid);

		CHECK(tap_ctl_connect_id(pid, &fd) == 0);
		memset(&message, 0, sizeof(message));
		message.type = TAPDISK_MESSAGE_DISK_INFO;
		message.cookie = minor;
		CHECK(tap_ctl_send_and_receive(fd, &message, NULL) == 0);
		CHECK(message.type == TAPDISK_MESSAGE_DISK_INFO_RSP);
		CHECK(message.u.image.sectors == sectors);
		close(fd);
	}

	/* Pause (state 0x2a in the listing), then resume on the same image. */
	{
		struct timeval timeout = { .tv_sec = 30, .tv_usec = 0 };
		FILE *out = tmpfile();

		CHECK(tap_ctl_pause(pid, minor, &timeout) == 0);
		CHECK(tap_ctl_list_pid(pid, &list) == 0);
		tap_list_for_each_entry(row, &list)
			if (row->minor == minor)
				CHECK(row->state == 0x2a);
		tap_ctl_list_free(&list);
		CHECK(tap_ctl_info(pid, &sectors, &sector_size, &info, minor) == 0);
		CHECK(tap_ctl_unpause(pid, minor, NULL, 0, NULL, NULL) == 0);

		CHECK(out != NULL);
		CHECK(tap_ctl_stats_fwrite(pid, minor, out) == 0);
		CHECK(ftell(out) > 2);
		fclose(out);
	}

	/* A minor this tapdisk does not serve. */
	CHECK(tap_ctl_info(pid, &sectors, &sector_size, &info, minor + 1) < 0);

	/* tapback's ring calls reach the daemon: no VBD at minor + 1, no ring connected. */
	{
		grant_ref_t gref = 8;

		CHECK(tap_ctl_connect_xenblkif(pid, 1, 51712, 0, 0, &gref, 0, 5, 1, "pool",
					       minor + 1) == -ENODEV);
		CHECK(tap_ctl_disconnect_xenblkif(pid, 1, 51712, NULL) == -ENODEV);
	}
	return 0;
}

static int destroy(pid_t pid, int minor, const char *image)
{
	struct timeval timeout = { .tv_sec = 30, .tv_usec = 0 };

	CHECK(tap_ctl_destroy(pid, minor, 0, &timeout) == 0);
	CHECK(tap_ctl_find_minor("aio", image) == -ENOENT);
	return 0;
}

/* One of several threads allocating, listing and freeing at once. */
static void *worker(void *unused)
{
	struct list_head list;
	char *devname;
	int i, minor;

	(void)unused;
	for (i = 0; i < 10; i++) {
		CHECK(tap_ctl_allocate(&minor, &devname) == 0);
		CHECK(tap_ctl_list(&list) == 0);
		CHECK(list.next != &list);
		tap_ctl_list_free(&list);
		CHECK(tap_ctl_free(minor) == 0);
		free(devname);
	}
	return NULL;
}

static int checks(const char *ctl_dir)
{
	pthread_t threads[4];
	char *type = NULL, *path = NULL, *name;
	char expected[512];
	struct list_head list;
	unsigned long long sectors;
	unsigned int sector_size, info;
	int major = 0, minor = 0, fd = 5;
	char *devname = NULL;
	grant_ref_t grefs[8] = { 8, 9, 10, 11, 12, 13, 14, 15 };

	tap_ctl_version(&major, &minor);
	CHECK(major == 1 && minor == 1);
	CHECK(tap_ctl_kernel_version(&major, &minor) == -ENOSYS);
	CHECK(tap_ctl_check_blktap(NULL) == 0);
	CHECK(tap_ctl_blk_major() == -ENOSYS);

	CHECK(parse_params("vhd:/a/b:c", &type, &path) == 0);
	CHECK(strcmp(type, "vhd") == 0 && strcmp(path, "/a/b:c") == 0);
	free(type);
	free(path);
	CHECK(parse_params("no-type", &type, &path) == -EINVAL);
	CHECK(parse_params(NULL, &type, &path) == -EINVAL);

	name = tap_ctl_socket_name(42);
	snprintf(expected, sizeof(expected), "%s/ctl42", ctl_dir);
	CHECK(name && strcmp(name, expected) == 0);
	free(name);

	/* NULL where a value is needed: -EINVAL, never a crash. */
	CHECK(tap_ctl_create(NULL, &devname, 0, -1, NULL, 0, NULL) == -EINVAL);
	CHECK(tap_ctl_create("aio:/x", NULL, 0, -1, NULL, 0, NULL) == -EINVAL);
	CHECK(tap_ctl_info(1, NULL, &sector_size, &info, 0) == -EINVAL);
	CHECK(tap_ctl_info(1, &sectors, &sector_size, NULL, 0) == -EINVAL);
	CHECK(tap_ctl_list(NULL) == -EINVAL);
	CHECK(tap_ctl_allocate(NULL, &devname) == -EINVAL);
	CHECK(tap_ctl_connect_id(1, NULL) == -EINVAL);
	CHECK(tap_ctl_stats(1, 0, NULL, 10) == -EINVAL);
	tap_ctl_list_free(NULL);
	CHECK(tap_ctl_attach(-1, 0) == -EINVAL);
	CHECK(tap_ctl_free(-1) == -EINVAL);

	/* Nobody there. */
	CHECK(tap_ctl_connect_id(999999, &fd) == -ENOENT);
	CHECK(fd == -1);
	CHECK(tap_ctl_get_pid(999999) == -ENOENT);
	CHECK(tap_ctl_list_pid(999999, &list) == 0);
	CHECK(list.next == &list);
	tap_ctl_list_free(&list);

	/* A ring's grant references: NULL, or an order above 3, is refused. */
	CHECK(tap_ctl_connect_xenblkif(1, 1, 51712, 0, 0, NULL, 0, 0, 1, NULL, 0) == -EINVAL);
	CHECK(tap_ctl_connect_xenblkif(1, 1, 51712, 0, 0, grefs, 4, 0, 1, NULL, 0) == -EINVAL);

	/* allocate and free: the marker file the C library names. */
	CHECK(tap_ctl_allocate(&minor, &devname) == 0);
	snprintf(expected, sizeof(expected), "%s/tapdisk/tapdisk-%d", ctl_dir, minor);
	CHECK(strcmp(devname, expected) == 0);
	free(devname);
	CHECK(tap_ctl_free(minor) == 0);
	CHECK(tap_ctl_free(minor) == -ENOENT);

	for (int i = 0; i < 4; i++)
		CHECK(pthread_create(&threads[i], NULL, worker, NULL) == 0);
	for (int i = 0; i < 4; i++)
		CHECK(pthread_join(threads[i], NULL) == 0);
	printf("checks passed\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	CHECK(tap_ctl_set_control_dir(argv[1]) == 0);
	CHECK(tap_ctl_set_tapdisk(argv[2]) == 0);

	if (!strcmp(argv[3], "create") && argc == 5)
		return create(argv[4]);
	if (!strcmp(argv[3], "list"))
		return list();
	if (!strcmp(argv[3], "tapback") && argc == 6)
		return tapback(atoi(argv[4]), atoi(argv[5]));
	if (!strcmp(argv[3], "destroy") && argc == 7)
		return destroy(atoi(argv[4]), atoi(argv[5]), argv[6]);
	if (!strcmp(argv[3], "checks"))
		return checks(argv[1]);
	return 2;
}
