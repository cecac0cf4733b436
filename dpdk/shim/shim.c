/*
 * The C side of dosd's DPDK bindings: DPDK's fast path is static inline functions
 * and macros in its headers, which Rust cannot call. Each function here wraps one
 * of them (or hides a struct whose layout Rust should not mirror) behind a plain
 * symbol that `src/sys.rs` declares. Compiled by build.rs with every flag of
 * `pkg-config --cflags libdpdk` (they include `-include rte_config.h` and
 * `-march=corei7`, which the headers rely on).
 *
 * Nothing here allocates, logs or keeps state: each function is one DPDK call
 * plus the field copies around it.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_memory.h>
#include <rte_mempool.h>

/* src/sys.rs mirrors these three structs; keep the layouts in step. */
_Static_assert(sizeof(struct rte_mbuf_ext_shared_info) == 24, "ext shinfo size");
_Static_assert(offsetof(struct rte_mbuf_ext_shared_info, free_cb) == 0, "free_cb");
_Static_assert(offsetof(struct rte_mbuf_ext_shared_info, fcb_opaque) == 8, "fcb_opaque");
_Static_assert(offsetof(struct rte_mbuf_ext_shared_info, refcnt) == 16, "refcnt");
_Static_assert(sizeof(struct rte_ether_addr) == 6, "ether addr");

struct dosd_port_stats {
	uint64_t ipackets, opackets, ibytes, obytes, imissed, ierrors, oerrors, rx_nombuf;
};

struct dosd_link {
	uint32_t speed_mbps;
	uint8_t up, full_duplex, autoneg, pad;
};

int dosd_rte_errno(void) { return rte_errno; }

unsigned int dosd_rte_lcore_id(void) { return rte_lcore_id(); }

uint16_t dosd_rte_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
			       uint16_t n)
{
	return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t dosd_rte_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
			       uint16_t n)
{
	return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *dosd_rte_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }

void dosd_rte_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

char *dosd_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }

char *dosd_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_prepend(m, len); }

char *dosd_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_adj(m, len); }

int dosd_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }

int dosd_rte_pktmbuf_chain(struct rte_mbuf *head, struct rte_mbuf *tail)
{
	return rte_pktmbuf_chain(head, tail);
}

/* rte_pktmbuf_mtod is a macro. */
void *dosd_rte_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }

uint16_t dosd_rte_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }

uint32_t dosd_rte_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }

uint16_t dosd_rte_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

uint16_t dosd_rte_pktmbuf_headroom(const struct rte_mbuf *m) { return rte_pktmbuf_headroom(m); }

uint16_t dosd_rte_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

/*
 * Whether the first segment's bytes belong to this mbuf alone: a direct mbuf (its
 * own data room, neither an attached clone nor an external buffer) with one
 * reference. Only then may Rust hand out `&mut [u8]` over them.
 */
int dosd_rte_pktmbuf_is_exclusive(const struct rte_mbuf *m)
{
	return RTE_MBUF_DIRECT(m) && rte_mbuf_refcnt_read(m) == 1;
}

void dosd_rte_pktmbuf_attach_extbuf(struct rte_mbuf *m, void *buf_addr, uint64_t buf_iova,
				    uint16_t buf_len, struct rte_mbuf_ext_shared_info *shinfo)
{
	rte_pktmbuf_attach_extbuf(m, buf_addr, buf_iova, buf_len, shinfo);
}

/* Carves the shared info out of the buffer's tail; shortens *buf_len by that much. */
struct rte_mbuf_ext_shared_info *
dosd_rte_pktmbuf_ext_shinfo_init_helper(void *buf_addr, uint16_t *buf_len,
					rte_mbuf_extbuf_free_callback_t free_cb, void *fcb_opaque)
{
	return rte_pktmbuf_ext_shinfo_init_helper(buf_addr, buf_len, free_cb, fcb_opaque);
}

/*
 * The IO address of memory DPDK did not allocate: the address itself in IOVA-as-VA
 * mode; otherwise what EAL can find out (RTE_BAD_IOVA when it cannot, e.g. without
 * the privilege to read /proc/self/pagemap). Vdevs that copy with the CPU ignore it;
 * DMA to such memory needs rte_extmem_register first.
 */
uint64_t dosd_ext_iova(void *addr)
{
	if (rte_eal_iova_mode() == RTE_IOVA_VA)
		return (uint64_t)(uintptr_t)addr;
	return rte_mem_virt2iova(addr);
}

/*
 * rte_eth_dev_configure with `nb_rx` receive and `nb_tx` transmit queues. With more
 * than one receive queue, RSS over IP/TCP/UDP, limited to the hash types the device
 * offers; a device that offers none gets no RSS (*rss_active = 0) rather than an
 * error, so that vdevs without RSS still take several queues.
 */
int dosd_eth_configure(uint16_t port, uint16_t nb_rx, uint16_t nb_tx, int *rss_active)
{
	struct rte_eth_dev_info info;
	struct rte_eth_conf conf;
	int rc;

	*rss_active = 0;
	rc = rte_eth_dev_info_get(port, &info);
	if (rc != 0)
		return rc;
	memset(&conf, 0, sizeof(conf));
	if (nb_rx > 1) {
		uint64_t hf = (RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP) &
			      info.flow_type_rss_offloads;
		if (hf != 0) {
			conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
			conf.rx_adv_conf.rss_conf.rss_key = NULL;
			conf.rx_adv_conf.rss_conf.rss_hf = hf;
			*rss_active = 1;
		}
	}
	return rte_eth_dev_configure(port, nb_rx, nb_tx, &conf);
}

int dosd_eth_stats(uint16_t port, struct dosd_port_stats *out)
{
	struct rte_eth_stats s;
	int rc = rte_eth_stats_get(port, &s);

	if (rc != 0)
		return rc;
	out->ipackets = s.ipackets;
	out->opackets = s.opackets;
	out->ibytes = s.ibytes;
	out->obytes = s.obytes;
	out->imissed = s.imissed;
	out->ierrors = s.ierrors;
	out->oerrors = s.oerrors;
	out->rx_nombuf = s.rx_nombuf;
	return 0;
}

int dosd_eth_link(uint16_t port, struct dosd_link *out)
{
	struct rte_eth_link l;
	int rc;

	memset(&l, 0, sizeof(l));
	rc = rte_eth_link_get_nowait(port, &l);
	if (rc != 0)
		return rc;
	out->speed_mbps = l.link_speed;
	out->up = l.link_status == RTE_ETH_LINK_UP;
	out->full_duplex = l.link_duplex == RTE_ETH_LINK_FULL_DUPLEX;
	out->autoneg = l.link_autoneg == RTE_ETH_LINK_AUTONEG;
	out->pad = 0;
	return 0;
}
