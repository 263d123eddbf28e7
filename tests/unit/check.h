/*
 * check.h — assertions of the C tests: a failed check prints where and what,
 * and the test exits 1 (STYLE: exit 0 pass, 1 fail, 77 skip).
 */
#ifndef CKV_TEST_CHECK_H
#define CKV_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                          \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
			exit(1);                                                             \
		}                                                                            \
	} while (0)

/* expr returns 0 or a negative errno */
#define CHECK_RC(expr)                                                                       \
	do {                                                                                 \
		int rc_ = (expr);                                                            \
		if (rc_ != 0) {                                                              \
			fprintf(stderr, "%s:%d: %s = %d (%s)\n", __FILE__, __LINE__, #expr, rc_,   \
				strerror(rc_ < 0 ? -rc_ : rc_));                                  \
			exit(1);                                                             \
		}                                                                            \
	} while (0)

#endif
