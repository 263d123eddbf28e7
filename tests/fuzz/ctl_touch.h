/*
 * ctl_touch.h — read every array element of a parsed control message, so
 * that ASan sees any overread the parser let through. Shared by the fuzz
 * target (tests/fuzz/fuzz_ctl_msg.c) and its CI replay (tests/unit/test_ctl_parse.c).
 */
#ifndef CKV_CTL_TOUCH_H
#define CKV_CTL_TOUCH_H

#include <stdint.h>

#include "ckv_ctl_msg.h"

static inline uint64_t ctl_touch(const ckv_ctl_msg *m)
{
	uint64_t acc = 0;

	switch (m->hdr.type) {
	case CKV_CTL_HELLO:
		for (uint32_t i = 0; i < m->u.hello.nversions; i++)
			acc += ckv_ctl_u16(m->u.hello.versions, i);
		break;
	case CKV_CTL_MATCH:
		for (uint32_t i = 0; i < m->u.match.ntokens; i++)
			acc += ckv_ctl_u32(m->u.match.tokens, i);
		for (uint32_t i = 0; i < m->u.match.model_len; i++)
			acc += (uint8_t)m->u.match.model[i];
		for (uint32_t i = 0; i < m->u.match.salt_len; i++)
			acc += (uint8_t)m->u.match.salt[i];
		break;
	case CKV_CTL_OPEN_OK:
		for (uint32_t i = 0; i < m->u.open_ok.model_len; i++)
			acc += (uint8_t)m->u.open_ok.model[i];
		for (uint32_t i = 0; i < m->u.open_ok.salt_len; i++)
			acc += (uint8_t)m->u.open_ok.salt[i];
		break;
	case CKV_CTL_GET:
	case CKV_CTL_PREFETCH:
		for (uint32_t i = 0; i < m->u.get.n; i++)
			acc += ckv_ctl_u32(m->u.get.chunks, i);
		break;
	case CKV_CTL_COMPLETE:
		for (uint32_t i = 0; i < m->u.complete.count; i++) {
			ckv_ctl_entry e;

			ckv_ctl_entry_load(m->u.complete.entries, i, &e);
			acc += e.index + e.offset + e.length + e.token + (uint32_t)e.rc;
		}
		break;
	case CKV_CTL_RELEASE:
		for (uint32_t i = 0; i < m->u.release.n; i++)
			acc += ckv_ctl_u64(m->u.release.tokens, i);
		break;
	case CKV_CTL_SCORE:
		for (uint32_t i = 0; i < m->u.score.n; i++)
			acc += ckv_ctl_u32(m->u.score.chunks, i) + ckv_ctl_u32(m->u.score.scores, i);
		break;
	case CKV_CTL_DIGESTS_OK:
		for (uint64_t i = 0; i < (uint64_t)m->u.digests_ok.count * m->u.digests_ok.per; i++)
			acc += ckv_ctl_u32(m->u.digests_ok.data, (size_t)i);
		break;
	case CKV_CTL_KEYQ_OK:
		for (uint32_t i = 0; i < m->u.keyq_ok.nparts; i++)
			acc += ckv_ctl_u32(m->u.keyq_ok.starts, i);
		for (uint64_t i = 0; i < 2ull * m->u.keyq_ok.hd * m->u.keyq_ok.nparts; i++)
			acc += ckv_ctl_u16(m->u.keyq_ok.scales, (size_t)i);
		for (uint64_t i = 0; i < (uint64_t)m->u.keyq_ok.count * m->u.keyq_ok.per; i++)
			acc += ((const uint8_t *)m->u.keyq_ok.codes)[i];
		break;
	case CKV_CTL_STATS_OK:
		for (uint32_t i = 0; i < m->u.stats_ok.nfields; i++)
			acc += ckv_ctl_u64(m->u.stats_ok.fields, i);
		break;
	case CKV_CTL_ERROR:
		for (uint32_t i = 0; i < m->u.error.text_len; i++)
			acc += (uint8_t)m->u.error.text[i];
		break;
	}
	return acc;
}

#endif
